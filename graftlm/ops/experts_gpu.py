"""`experts.gpu`: routed experts on the accelerator, each expert's matrices int4 group 32 or bf16.

Gate and up projections of an expert are one [2I, H] matrix, the down projection [H, I], in the
layouts of graftlm/kernels/cuda/int4.py (error bounds there); grouping of (token, expert) pairs is
shared with `experts.torch`. On a CPU `generate_device` the same layout runs through torch's CPU
int4 kernel, which is how it is tested without a GPU.
"""

from __future__ import annotations

import torch

from graftlm.kernels.cuda.int4 import DeviceMatrix, to_device_matrix
from graftlm.ops.base import InjectedModule
from graftlm.ops.experts import grouped_apply
from graftlm.ops.experts_cpu import _expert_rows
from graftlm.ops.linear_cpu import quantized_param
from graftlm.ops.linear_gpu import log_requantized


class ExpertsGPU(InjectedModule, name="experts.gpu"):
    """Routed experts computed per expert on int4 (or bf16) matrices on `generate_device`."""

    def __init__(self, key, source, config, orig_module, layout: str = "auto", **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        if layout not in ("auto", "int4", "bf16"):
            raise ValueError(f"experts.gpu at {key!r}: layout must be auto, int4 or bf16, not {layout!r}")
        self.num_experts, two_i, self.hidden_dim = orig_module.gate_up_proj.shape
        self.intermediate_dim = two_i // 2
        self.act_fn = orig_module.act_fn
        self.layout = layout
        self.gate_up: list[DeviceMatrix] = []
        self.down: list[DeviceMatrix] = []

    def load(self) -> None:
        gate_up = quantized_param(self.source, self.weight_name("gate_up_proj"))
        down = quantized_param(self.source, self.weight_name("down_proj"))
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        if gate_up.shape != (e, 2 * i, h) or down.shape != (e, h, i):
            raise ValueError(
                f"{self.key}: expert shapes {gate_up.shape} / {down.shape}, expected {(e, 2 * i, h)} / {(e, h, i)}"
            )
        self.gate_up = [
            to_device_matrix(_expert_rows(gate_up, x), self.device, self.layout) for x in range(e)
        ]
        self.down = [to_device_matrix(_expert_rows(down, x), self.device, self.layout) for x in range(e)]
        log_requantized(self.key, self.gate_up + self.down)

    def unload(self) -> None:
        self.gate_up, self.down = [], []

    def _expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[e].matmul(xs).chunk(2, dim=-1)
        return self.down[e].matmul(self.act_fn(gate) * up)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        x = hidden_states.to(device=self.device, dtype=torch.float32)
        index, weights = top_k_index.to(self.device), top_k_weights.to(self.device)
        y = grouped_apply(x, index, weights, self.num_experts, self._expert)
        return self.to_out(y, hidden_states)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.gate_up + self.down)

    def extra_repr(self) -> str:
        kinds = sorted({f"{m.source_type}->{m.layout}" for m in self.gate_up + self.down})
        return f"{super().extra_repr()}, experts={self.num_experts}, {', '.join(kinds) or 'unloaded'}"
