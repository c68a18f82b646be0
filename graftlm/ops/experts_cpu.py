"""`experts.cpu`: routed experts on GGUF-quantized weights, repacked once at load.

Each expert's gate and up projections form one [2I, H] matrix (one kernel call instead of two), its
down projection [H, I]; the kernels and error bounds are those of graftlm/kernels/cpu/packed.py.
Routing of (token, expert) pairs is shared with `experts.torch` (graftlm/ops/experts.py).
"""

from __future__ import annotations

import gguf
import torch

from graftlm.kernels.cpu import qblocks
from graftlm.kernels.cpu.packed import PackedMatrix, pack
from graftlm.ops.packed import PackedExperts
from graftlm.weights.source import QuantizedTensor


class ExpertsCPU(PackedExperts, name="experts.cpu"):
    """Routed experts computed per expert on repacked quantized weights."""

    layouts = ("auto", "gguf", "int4", "int8", "bf16", "f32")

    def __init__(self, key, source, config, orig_module, int8_activations: bool = False, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        self.int8_activations = int8_activations
        self._batched: tuple | None = None  # see after_load
        if self.device.type != "cpu":
            raise ValueError(f"experts.cpu at {key!r} runs on the CPU, not {self.device}")

    def pack_matrix(self, q: QuantizedTensor) -> PackedMatrix:
        return pack(q, self.layout, int8_activations=self.int8_activations)

    def after_load(self) -> None:
        super().after_load()
        # A decode step (one token) runs its routed experts' gate-up products in one C call and their
        # down products in another, when every expert keeps GGUF blocks of one type per projection.
        self._batched = None
        if all(m.layout == "gguf" for m in self.gate_up + self.down):
            kinds = [{m.source_type for m in ms} for ms in (self.gate_up, self.down)]
            if all(len(k) == 1 for k in kinds):
                self._batched = tuple(
                    (
                        gguf.GGMLQuantizationType[ms[0].source_type],
                        torch.tensor([m.ptr for m in ms]),
                        ms[0].weight.shape[1],
                    )
                    for ms in (self.gate_up, self.down)
                )

    def unload(self) -> None:
        self._batched = None
        super().unload()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if self._batched is None or hidden_states.shape[0] != 1:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        index = top_k_index.reshape(-1).to(self.device)
        keep = index < self.num_experts  # HF pads with num_experts
        index, weights = index[keep], top_k_weights.reshape(-1).to(self.device)[keep]
        (gu_type, gu_ptrs, gu_bytes), (d_type, d_ptrs, d_bytes) = self._batched
        x = hidden_states.to(device=self.device, dtype=torch.float32)
        gate_up = qblocks.matmul_experts(gu_type, gu_ptrs[index], gu_bytes, 2 * self.intermediate_dim, x)
        gate, up = gate_up.chunk(2, dim=-1)
        down = qblocks.matmul_experts(d_type, d_ptrs[index], d_bytes, self.hidden_dim, self.act_fn(gate) * up)
        y = (down * weights[:, None].float()).sum(0, keepdim=True)
        return self.to_out(y.to(x.dtype), hidden_states)
