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
        # A decode step (one token) runs its routed experts in two C calls: gate and up together (the
        # two sets of matrices, or the fused [2I, H] ones), then down. That needs GGUF blocks of one
        # type and shape per projection; otherwise the per-expert path runs.
        self._batched = None
        if self.gate_up and isinstance(self.gate_up[0], GatePair):
            gate_up = [[p.gate for p in self.gate_up], [p.up for p in self.gate_up]]
        else:
            gate_up = [self.gate_up]
        specs = [self._spec(sets) for sets in (gate_up, [self.down])]
        if None not in specs:
            self._batched = tuple(specs)

    @staticmethod
    def _spec(sets: list[list]) -> tuple | None:
        """(type, int64 addresses [E] or [S, E], row bytes, N) for S sets of E matrices that all keep
        GGUF blocks of one type and shape; None otherwise."""
        mats = [m for ms in sets for m in ms]
        if not all(m.layout == "gguf" for m in mats) or len({(m.source_type, m.n, m.k) for m in mats}) != 1:
            return None
        ptrs = torch.tensor([[m.ptr for m in ms] for ms in sets])
        return (
            gguf.GGMLQuantizationType[mats[0].source_type],
            ptrs.squeeze(0),
            mats[0].weight.shape[1],
            mats[0].n,
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
        (gu_type, gu_ptrs, gu_bytes, gu_n), (d_type, d_ptrs, d_bytes, d_n) = self._batched
        gate_up = qblocks.matmul_experts(gu_type, gu_ptrs[..., index], gu_bytes, gu_n, x)
        gate, up = gate_up if gu_ptrs.dim() == 2 else gate_up.chunk(2, dim=-1)
        down = qblocks.matmul_experts(d_type, d_ptrs[index], d_bytes, d_n, self.act_fn(gate) * up)
        y = (down * weights[:, None].float()).sum(0, keepdim=True)
        return self.to_out(y.to(x.dtype), hidden_states)
