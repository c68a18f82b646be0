"""`experts.cpu`: routed experts on GGUF-quantized weights, repacked once at load.

Where the layout keeps the file's blocks (`gguf`), each expert's gate and up projections stay the
file's two tensors (a GatePair; no concatenated copy), else they are one repacked [2I, H] matrix; its
down projection is [H, I]. The kernels and error bounds are those of graftlm/kernels/cpu/packed.py.
Routing of (token, expert) pairs is shared with `experts.torch` (graftlm/ops/experts.py).
"""

from __future__ import annotations

import gguf
import torch

from graftlm.kernels.cpu import qblocks
from graftlm.kernels.cpu.packed import PackedMatrix, pack
from graftlm.ops.packed import GatePair, PackedExperts
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

    @property
    def split_gate_up(self) -> bool:  # the file's own blocks: keep gate and up apart
        return self.layout == "gguf" or (self.layout == "auto" and qblocks.available())

    def after_load(self) -> None:
        super().after_load()
        # A decode step (one token) runs its routed experts' products in one C call per projection
        # (gate, up and down; or fused gate-up and down), when every expert keeps GGUF blocks of one
        # type per projection.
        self._batched = None
        if self.gate_up and isinstance(self.gate_up[0], GatePair):
            projections = [[p.gate for p in self.gate_up], [p.up for p in self.gate_up], self.down]
        else:
            projections = [self.gate_up, self.down]
        if all(m.layout == "gguf" for ms in projections for m in ms):
            if all(len({m.source_type for m in ms}) == 1 for ms in projections):
                self._batched = tuple(
                    (
                        gguf.GGMLQuantizationType[ms[0].source_type],
                        torch.tensor([m.ptr for m in ms]),
                        ms[0].weight.shape[1],
                        ms[0].n,
                    )
                    for ms in projections
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
        x = hidden_states.to(device=self.device, dtype=torch.float32)
        *first, (d_type, d_ptrs, d_bytes, d_n) = self._batched
        if len(first) == 2 and first[0][0] == first[1][0] and first[0][2:] == first[1][2:]:
            # gate and up of one type and shape: one call over both sets of matrices
            gu_type, _, gu_bytes, gu_n = first[0]
            ptrs = torch.stack([first[0][1][index], first[1][1][index]])
            gate, up = qblocks.matmul_experts(gu_type, ptrs, gu_bytes, gu_n, x)
        else:
            outs = [qblocks.matmul_experts(t, ptrs[index], nbytes, n, x) for t, ptrs, nbytes, n in first]
            gate, up = outs if len(outs) == 2 else outs[0].chunk(2, dim=-1)
        down = qblocks.matmul_experts(d_type, d_ptrs[index], d_bytes, d_n, self.act_fn(gate) * up)
        y = (down * weights[:, None].float()).sum(0, keepdim=True)
        return self.to_out(y.to(x.dtype), hidden_states)
