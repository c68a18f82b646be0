"""Bases for operators that compute on packed (repacked quantized) weight matrices.

A subclass names the layouts it accepts and says how one GGUF matrix becomes a packed matrix on its
device (`pack_matrix`); loading, shape checks, the forward pass and the routing of experts are
shared. A packed matrix has `matmul(x) -> fp32`, `nbytes`, `layout` and `source_type`.
`linear.cpu`/`experts.cpu` (graftlm/kernels/cpu/packed.py) and `linear.gpu`/`experts.gpu`
(graftlm/kernels/cuda/int4.py) are the two families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import gguf
import torch

from graftlm.errors import GraftError
from graftlm.kernels.cpu import qblocks
from graftlm.ops.base import InjectedModule, LinearBase, gated
from graftlm.ops.experts import check_experts_module, grouped_apply
from graftlm.weights.source import QuantizedTensor, WeightSource


def quantized_param(source: WeightSource, hf_name: str) -> QuantizedTensor:
    """The parameter as quantized blocks in HF row order, or as fp32 values when the source or
    the file layout cannot give blocks (the packer then works from values)."""
    raw_hf = getattr(source, "raw_hf", None)
    q = raw_hf(hf_name) if raw_hf is not None else None
    if q is not None:
        return q
    value = source.get(hf_name, dtype=torch.float32)
    return QuantizedTensor(hf_name, gguf.GGMLQuantizationType.F32, tuple(value.shape), value.numpy())


def expert_rows(q: QuantizedTensor, e: int) -> QuantizedTensor:
    """Expert `e`'s matrix of a stacked [E, rows, cols] tensor."""
    return QuantizedTensor(f"{q.name}[{e}]", q.qtype, tuple(q.shape[1:]), q.data[e])


@dataclass
class GatePair:
    """One expert's gate and up matrices, packed apart: [2I, H] as the fused HF parameter, without
    concatenating the file's blocks into a copy. `matmul` returns [.., 2I] (gate, then up)."""

    gate: Any
    up: Any

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.pair(x), dim=-1)

    def pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x @ gate^T, x @ up^T), each contiguous [.., I]."""
        gate, up = self.gate, self.up
        if gate.layout == up.layout == "gguf":
            rows = x.shape[0]
            if rows <= min(gate.kernel_rows, up.kernel_rows):
                return tuple(
                    qblocks.matmul_many([gate.prepared, up.prepared], x)
                )  # x quantized once, one call
            if (
                gate.bf16_tiles
                and up.bf16_tiles
                and rows > max(gate.amx_rows, up.amx_rows)
                and qblocks.amx_bf16()
            ):
                return tuple(qblocks.matmul_amx_bf16_many([gate.prepared, up.prepared], x))  # x rounded once
        return gate.matmul(x), up.matmul(x)

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes

    @property
    def layout(self) -> str:
        return (
            self.gate.layout if self.gate.layout == self.up.layout else f"{self.gate.layout}+{self.up.layout}"
        )

    @property
    def source_type(self) -> str:
        kinds = (self.gate.source_type, self.up.source_type)
        return kinds[0] if kinds[0] == kinds[1] else "+".join(kinds)


def raw_parts(source: WeightSource, hf_name: str) -> list[QuantizedTensor] | None:
    """The file tensors behind an HF parameter, undecoded; None where the source has none (a
    safetensors folder or memory holds plain tensors, and its `raw` says so by raising)."""
    raw = getattr(source, "raw", None)
    if raw is None:
        return None
    try:
        return raw(hf_name)
    except GraftError:
        return None


def gate_and_up(source: WeightSource, hf_name: str, shape: tuple[int, int, int]) -> tuple | None:
    """The file's separate gate and up expert tensors [E, I, H] behind a fused `gate_up_proj`
    [E, 2I, H], undecoded; None where the source has no such pair."""
    parts = raw_parts(source, hf_name)
    e, two_i, h = shape
    if not parts or len(parts) != 2 or any(p.shape != (e, two_i // 2, h) for p in parts):
        return None
    return tuple(parts)


class _Packing:
    """The layout argument and the packer a concrete operator supplies."""

    layouts: ClassVar[tuple[str, ...]] = ("auto",)

    def _check_layout(self, key: str, layout: str) -> None:
        if layout not in self.layouts:
            raise ValueError(
                f"{self.op_name} at {key!r}: layout must be one of {', '.join(self.layouts)}, not {layout!r}"
            )

    def pack_matrix(self, q: QuantizedTensor) -> Any:
        """One GGUF matrix [N, K] in this operator's layout on its device."""
        raise NotImplementedError

    def after_load(self) -> None:
        """Hook once all matrices are packed (e.g. a log line about re-quantization)."""

    def _kinds(self, matrices: list) -> str:
        return ", ".join(sorted({f"{m.source_type}->{m.layout}" for m in matrices})) or "unloaded"


class PackedLinear(_Packing, LinearBase):
    """y = x W^T + b on one packed matrix (`self.packed`)."""

    def __init__(self, key, source, config, orig_module, layout: str = "auto", **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        self._check_layout(key, layout)
        self.layout = layout
        self.packed: Any = None
        self.register_buffer("bias", None)

    def load(self) -> None:
        q = quantized_param(self.source, self.weight_name("weight"))
        if q.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.weight_name('weight')}: shape {q.shape}, expected {(self.out_features, self.in_features)}"
            )
        self.packed = self.pack_matrix(q)
        if self.has_bias:
            self.bias = self.source.get(self.weight_name("bias"), dtype=torch.float32, device=self.device)
        self.after_load()

    def unload(self) -> None:
        self.packed = None
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.to(self.device).reshape(-1, self.in_features)
        y = self.packed.matmul(flat).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return self.to_out(y, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._kinds([self.packed] if self.packed is not None else [])}"


class PackedExperts(_Packing, InjectedModule):
    """Routed experts, each with a packed [2I, H] gate-and-up matrix and an [H, I] down matrix."""

    def __init__(self, key, source, config, orig_module, layout: str = "auto", **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        self._check_layout(key, layout)
        check_experts_module(self.op_name, key, orig_module)
        self.num_experts, two_i, self.hidden_dim = orig_module.gate_up_proj.shape
        self.intermediate_dim = two_i // 2
        self.act_fn = orig_module.act_fn
        self.layout = layout
        self.gate_up: list = []
        self.down: list = []

    # Whether gate and up stay two matrices where the file has them apart (GatePair): for layouts
    # that keep the file's blocks, so that no concatenated copy of two thirds of the experts exists.
    split_gate_up: ClassVar[bool] = False

    def load(self) -> None:
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        name = self.weight_name("gate_up_proj")
        pair = gate_and_up(self.source, name, (e, 2 * i, h)) if self.split_gate_up else None
        if pair is not None:
            gate, up = pair
            self.gate_up = [
                GatePair(self.pack_matrix(expert_rows(gate, x)), self.pack_matrix(expert_rows(up, x)))
                for x in range(e)
            ]
        else:
            gate_up = quantized_param(self.source, name)
            if gate_up.shape != (e, 2 * i, h):
                raise ValueError(f"{self.key}: gate_up_proj shape {gate_up.shape}, expected {(e, 2 * i, h)}")
            self.gate_up = [self.pack_matrix(expert_rows(gate_up, x)) for x in range(e)]
        down = quantized_param(self.source, self.weight_name("down_proj"))
        if down.shape != (e, h, i):
            raise ValueError(f"{self.key}: down_proj shape {down.shape}, expected {(e, h, i)}")
        self.down = [self.pack_matrix(expert_rows(down, x)) for x in range(e)]
        self.after_load()

    def unload(self) -> None:
        self.gate_up, self.down = [], []

    def _expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up[e]
        # a GatePair's two products stay apart: no concatenated copy to split again
        gate, up = gate_up.pair(xs) if isinstance(gate_up, GatePair) else gate_up.matmul(xs).chunk(2, dim=-1)
        return self.down[e].matmul(gated(self.act_fn, gate, up))

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
        return f"{super().extra_repr()}, experts={self.num_experts}, {self._kinds(self.gate_up + self.down)}"
