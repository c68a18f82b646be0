"""`experts.cpu`: routed experts on GGUF-quantized weights, repacked once at load.

Each expert's gate and up projections are packed together as one [2I, H] matrix when they share a
GGUF type (one kernel call instead of two), its down projection as [H, I]; the kernels and error
bounds are those of graftlm/kernels/cpu/packed.py. Grouping of (token, expert) pairs is shared with
`experts.torch`, so only the per-expert matmuls differ.
"""

from __future__ import annotations

import torch

from graftlm.kernels.cpu.packed import PackedMatrix, pack
from graftlm.ops.base import InjectedModule
from graftlm.ops.experts import grouped_apply
from graftlm.ops.linear_cpu import quantized_param
from graftlm.weights.source import QuantizedTensor


def _expert_rows(q: QuantizedTensor, e: int) -> QuantizedTensor:
    return QuantizedTensor(f"{q.name}[{e}]", q.qtype, tuple(q.shape[1:]), q.data[e])


class ExpertsCPU(InjectedModule, name="experts.cpu"):
    """Routed experts computed per expert on repacked quantized weights."""

    def __init__(self, key, source, config, orig_module, layout: str = "auto", **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        if self.device.type != "cpu":
            raise ValueError(f"experts.cpu at {key!r} runs on the CPU, not {self.device}")
        self.num_experts, two_i, self.hidden_dim = orig_module.gate_up_proj.shape
        self.intermediate_dim = two_i // 2
        self.act_fn = orig_module.act_fn
        self.layout = layout
        self.gate_up: list[PackedMatrix] = []
        self.down: list[PackedMatrix] = []

    def load(self) -> None:
        gate_up = quantized_param(self.source, self.weight_name("gate_up_proj"))
        down = quantized_param(self.source, self.weight_name("down_proj"))
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        if gate_up.shape != (e, 2 * i, h) or down.shape != (e, h, i):
            raise ValueError(
                f"{self.key}: expert shapes {gate_up.shape} / {down.shape}, expected {(e, 2 * i, h)} / {(e, h, i)}"
            )
        self.gate_up = [pack(_expert_rows(gate_up, x), self.layout) for x in range(e)]
        self.down = [pack(_expert_rows(down, x), self.layout) for x in range(e)]

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
        return sum(p.nbytes for p in self.gate_up + self.down)

    def extra_repr(self) -> str:
        kinds = sorted({f"{p.source_type}->{p.layout}" for p in self.gate_up + self.down})
        return f"{super().extra_repr()}, experts={self.num_experts}, {', '.join(kinds) or 'unloaded'}"
