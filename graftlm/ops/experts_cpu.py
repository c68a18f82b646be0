"""`experts.cpu`: routed experts on GGUF-quantized weights, repacked once at load.

Where the layout keeps the file's blocks (`gguf`), each expert's gate and up projections stay the
file's two tensors (a GatePair; no concatenated copy), else they are one repacked [2I, H] matrix; its
down projection is [H, I]. The kernels and error bounds are those of graftlm/kernels/cpu/packed.py,
with two shortcuts that call the C kernels directly: a decode step's experts in two `matmul_experts`
calls, and, where the CPU has AMX bf16 tiles, a prefill's experts above the one-row kernel's bound
in two grouped bf16 tile calls per layer (the bf16 tile kernel's error bound, from 3-5 rows up,
where the matrices one by one would take the int8 tiles up to 6-12 rows). Routing of (token,
expert) pairs is shared with `experts.torch` (graftlm/ops/experts.py).
"""

from __future__ import annotations

import gguf
import torch

from graftlm.kernels.cpu import qblocks
from graftlm.kernels.cpu.packed import PackedMatrix, pack
from graftlm.ops.base import gated
from graftlm.ops.experts import _temporary, combine, route
from graftlm.ops.packed import GatePair, PackedExperts
from graftlm.weights.source import QuantizedTensor


class ExpertsCPU(PackedExperts, name="experts.cpu"):
    """Routed experts computed per expert on repacked quantized weights."""

    layouts = ("auto", "gguf", "int4", "int8", "bf16", "f32")

    def __init__(self, key, source, config, orig_module, int8_activations: bool = False, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        self.int8_activations = int8_activations
        self._batched: tuple | None = None  # see after_load
        self._tile_rows: list[int] | None = None  # see after_load
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
        # A prefill runs the experts with more rows than the one-row C kernel takes (per expert: the
        # most of its three matrices' bounds, 2-4 rows) in two C calls, on the bf16 tiles: every such
        # expert's gate and up, then every such expert's down. That needs the file's gate and up
        # apart, and every matrix on the bf16 tiles; the other experts run one by one. Taken one by
        # one, 5-10 rows run faster on the int8 tiles (bench/amx_bf16.py); in the grouped calls the
        # bf16 tiles win there too (Qwen2-MoE-shape prefill 1.05-1.07x against grouping only above
        # the int8 tiles' bound, 2 threads, in one process, alternating; DeepSeek shape 0.95-1.05x:
        # `python bench/amx_prefill.py MODEL --group-above 10`).
        self._tile_rows = None
        pairs = [(p, d) for p, d in zip(self.gate_up, self.down) if isinstance(p, GatePair)]
        if len(pairs) == self.num_experts and all(m.bf16_tiles for p, d in pairs for m in (p.gate, p.up, d)):
            self._tile_rows = [max(p.gate.kernel_rows, p.up.kernel_rows, d.kernel_rows) for p, d in pairs]

    @staticmethod
    def _spec(sets: list[list]) -> tuple | None:
        """(type, int64 addresses [E] or [S, E], row bytes, N) for S sets of E matrices that all keep
        GGUF blocks of one type and shape; None otherwise."""
        mats = [m for ms in sets for m in ms]
        if not all(m.layout == "gguf" for m in mats) or len({(m.source_type, m.n, m.k) for m in mats}) != 1:
            return None
        ptrs = torch.tensor([[m.ptr for m in ms] for ms in sets])
        return (
            int(gguf.GGMLQuantizationType[mats[0].source_type]),
            ptrs.squeeze(0),
            mats[0].weight.shape[1],
            mats[0].n,
        )

    def unload(self) -> None:
        self._batched = self._tile_rows = None
        super().unload()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if (
            self._tile_rows is not None
            and hidden_states.shape[0] > 1
            and hidden_states.device.type == "cpu"
            and top_k_index.device.type == "cpu"
            and top_k_weights.device.type == "cpu"
            and not torch.is_grad_enabled()
            and qblocks.amx_bf16()
        ):
            return self._prefill(hidden_states, top_k_index, top_k_weights)
        if (
            self._batched is None
            or hidden_states.shape[0] != 1
            or hidden_states.dtype != torch.float32
            or hidden_states.device.type != "cpu"
            or top_k_index.device.type != "cpu"
        ):
            return super().forward(hidden_states, top_k_index, top_k_weights)
        # One token: two direct C calls (gate and up of every chosen expert, then down), with only
        # the checks these inputs need (a decode step makes one such call per MoE layer).
        index, weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)
        if int(index.max()) >= self.num_experts:  # HF pads with num_experts
            keep = index < self.num_experts
            index, weights = index[keep], weights[keep]
        count = index.numel()
        if count == 0:
            return torch.zeros_like(hidden_states)
        (gu_type, gu_ptrs, gu_bytes, gu_n), (d_type, d_ptrs, d_bytes, d_n) = self._batched
        kernels, threads = qblocks._qkernels, torch.get_num_threads()
        x = hidden_states.contiguous()
        ptrs = gu_ptrs[..., index]  # [2, E] (gate, up) or [E] (fused gate-up rows)
        gate_up = torch.empty(*ptrs.shape, gu_n, dtype=torch.float32)
        sets = ptrs.shape[0] if ptrs.dim() == 2 else 1
        kernels.matmul_experts(
            gu_type, ptrs.data_ptr(), count, gu_bytes, gu_n, x.shape[-1], x.data_ptr(), 1, gate_up.data_ptr(),
            threads, sets,
        )  # fmt: skip
        gate, up = gate_up if sets == 2 else gate_up.chunk(2, dim=-1)
        h = gated(self.act_fn, gate, up).contiguous()
        ptrs = d_ptrs[index]
        down = torch.empty(count, d_n, dtype=torch.float32)
        kernels.matmul_experts(
            d_type, ptrs.data_ptr(), count, d_bytes, d_n, h.shape[-1], h.data_ptr(), count, down.data_ptr(),
            threads, 1,
        )  # fmt: skip
        y = (down * weights[:, None].float()).sum(0, keepdim=True)
        return y if self.out_device is None else y.to(self.out_device)

    def _prefill(self, hidden_states, top_k_index, top_k_weights):
        """Many tokens: the experts above the one-row kernel's bound in two grouped bf16 tile calls
        (every such expert's gate and up, the activation over each run of them, then every such
        expert's down), the others one by one."""
        x = hidden_states.to(torch.float32).contiguous()
        routing = route(x, top_k_index, self.num_experts)
        xs, valid, inter = routing.xs, routing.xs.shape[0], self.intermediate_dim
        out = _temporary("out", valid, x)
        gate = _temporary("gate", valid, x.new_empty(0, inter))
        up = _temporary("up", valid, x.new_empty(0, inter))
        gate_up, runs, small = [], [], []  # runs: [start, end, experts] of consecutive tile experts
        for e, (start, end) in enumerate(routing.spans):
            if end == start:
                continue
            if end - start <= self._tile_rows[e]:
                small.append(e)
                continue
            pair, rows = self.gate_up[e], xs[start:end]
            gate_up += [(pair.gate.prepared, rows, gate[start:end]), (pair.up.prepared, rows, up[start:end])]
            if runs and runs[-1][1] == start:
                runs[-1][1] = end
                runs[-1][2].append(e)
            else:
                runs.append([start, end, [e]])
        qblocks.matmul_amx_bf16_grouped(gate_up)
        down = []
        for start, end, experts in runs:  # one activation per run (the views below keep each alive)
            h = gated(self.act_fn, gate[start:end], up[start:end])
            for e in experts:
                s, t = routing.spans[e]
                down.append((self.down[e].prepared, h[s - start : t - start], out[s:t]))
        qblocks.matmul_amx_bf16_grouped(down)
        for e in small:
            start, end = routing.spans[e]
            out[start:end] = self._expert(e, xs[start:end])
        return self.to_out(combine(x, routing, out, top_k_weights), hidden_states)
