"""Hugging Face parameter names <-> GGUF tensor names, as data plus a few hooks.

The base table is gguf-py's `TensorNameMap`. Hooks cover what a plain rename cannot:

- fused experts: HF `mlp.experts.gate_up_proj` [E, 2I, H] is GGUF `ffn_gate_exps` and `ffn_up_exps`
  concatenated on dim 1; `down_proj` [E, H, I] is `ffn_down_exps`;
- DeepSeek's `kv_b_proj` is stored split as `attn_k_b` [H, r, nope] (transposed) and `attn_v_b` [H, v, r];
- the Llama Q/K row permutation (llama.cpp rotates adjacent pairs, HF rotates halves);
- Gemma's norms, stored as 1 + w because HF's Gemma RMSNorm multiplies by (1 + w);
- vectors that HF keeps as [1, N] rows and GGUF as [N].

Each `TensorMap` converts both ways, so loading and `graftlm convert` share one table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from graftlm.errors import UnsupportedArchitecture, WeightMappingError

Shape = tuple[int, ...]


def _identity(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0]


def _single(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


@dataclass(frozen=True)
class TensorMap:
    """How one HF parameter is made from file tensors, and back."""

    hf_name: str
    gguf_names: tuple[str, ...]
    to_hf: Callable[[list[torch.Tensor]], torch.Tensor] = _identity
    from_hf: Callable[[torch.Tensor], list[torch.Tensor]] = _single
    # The file tensors' shapes (torch order) given the HF shape; used by convert and shape checks.
    file_shapes: Callable[[Shape], list[Shape]] = lambda s: [s]
    # How the file tensors' raw rows ([..., rows, bytes_per_row] uint8) become the HF parameter's
    # rows, for layouts that only move whole rows; None when the HF layout needs decoded values.
    raw_to_hf: Callable[[list[np.ndarray]], np.ndarray] | None = _identity


def _gguf_arch(arch: str) -> gguf.MODEL_ARCH:
    for key, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return key
    raise UnsupportedArchitecture(f"gguf-py knows no architecture '{arch}'")


def _block_tensor(hf_name: str, tensor: gguf.MODEL_TENSOR) -> str:
    """`blk.N.<tensor>.weight` for an HF name under `model.layers.N.`."""
    parts = hf_name.split(".")
    bid = int(parts[parts.index("layers") + 1])
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + ".weight"


def _llama_permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF (rotate-half) rows -> llama.cpp (adjacent-pair) rows, as convert_hf_to_gguf does."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _llama_unpermute(t, n_head: int):
    """The inverse of `_llama_permute`; works on torch tensors and numpy arrays of rows alike."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


class NameTable:
    """The name maps for one model: an architecture, its HF config and its HF parameter shapes."""

    def __init__(self, arch: str, config, hf_shapes: Mapping[str, Shape], file_names: set[str] | None = None):
        self.arch = arch
        self.config = config
        self._tmap = gguf.get_tensor_name_map(_gguf_arch(arch), config.num_hidden_layers)
        self._file_names = file_names
        self.redundant: set[str] = set()  # file tensors that repeat mapped ones in another layout
        self.maps: dict[str, TensorMap] = {}
        for name, shape in hf_shapes.items():
            self.maps[name] = self._map_one(name, tuple(shape))

    # -- lookups --------------------------------------------------------------------------------
    def _base(self, hf_name: str) -> str:
        """The GGUF name of one HF tensor by plain rename (no hook)."""
        for key, suffix in (
            (hf_name, ""),
            *((hf_name[: -len(s)], s) for s in (".weight", ".bias") if hf_name.endswith(s)),
        ):
            found = self._tmap.get_name(key)
            if found is not None:
                return found + suffix
        # gguf-py spells DeepSeek-V3's router bias as `...gate.e_score_correction` + ".bias".
        if hf_name.endswith("e_score_correction_bias"):
            found = self._tmap.get_name(hf_name.removesuffix("_bias"))
            if found is not None:
                return found + ".bias"
        raise WeightMappingError(
            f"no GGUF tensor name for HF parameter '{hf_name}' (architecture '{self.arch}'); "
            "the name table in graftlm/weights/names.py needs an entry"
        )

    def _has_file(self, name: str) -> bool:
        return self._file_names is None or name in self._file_names

    def _map_one(self, name: str, shape: Shape) -> TensorMap:
        cfg = self.config
        if name.endswith("mlp.experts.gate_up_proj"):
            gate, up = (
                _block_tensor(name, t) for t in (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP)
            )
            return TensorMap(
                name,
                (gate, up),
                to_hf=lambda p: torch.cat(p, dim=1),
                from_hf=lambda t: list(t.chunk(2, dim=1)),
                file_shapes=lambda s: [(s[0], s[1] // 2, s[2])] * 2,
                raw_to_hf=lambda p: np.concatenate(p, axis=1),
            )
        if name.endswith("mlp.experts.down_proj"):
            return TensorMap(name, (_block_tensor(name, gguf.MODEL_TENSOR.FFN_DOWN_EXP),))
        if name.endswith("self_attn.kv_b_proj.weight"):
            return self._kv_b(name)
        gguf_name = self._base(name)
        if self.arch == "llama" and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            return TensorMap(
                name,
                (gguf_name,),
                to_hf=lambda p, h=heads: _llama_unpermute(p[0], h),
                from_hf=lambda t, h=heads: [_llama_permute(t, h)],
                raw_to_hf=lambda p, h=heads: _llama_unpermute(p[0], h),  # whole rows move
            )
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            return TensorMap(
                name, (gguf_name,), to_hf=lambda p: p[0] - 1.0, from_hf=lambda t: [t + 1.0], raw_to_hf=None
            )
        if len(shape) == 2 and shape[0] == 1:  # e.g. Qwen2-MoE's shared_expert_gate [1, H], stored as [H]
            return TensorMap(
                name,
                (gguf_name,),
                to_hf=lambda p, s=shape: p[0].reshape(s),
                from_hf=lambda t: [t.reshape(-1)],
                file_shapes=lambda s: [(s[1],)],
                raw_to_hf=None,
            )
        return TensorMap(name, (gguf_name,))

    def _kv_b(self, name: str) -> TensorMap:
        kv_b = self._base(name)
        cfg = self.config
        heads, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        k_b, v_b = kv_b.replace("attn_kv_b", "attn_k_b"), kv_b.replace("attn_kv_b", "attn_v_b")
        if self._file_names is not None and kv_b in self._file_names:
            # Some files carry both forms; the split pair then repeats kv_b and is not read.
            self.redundant.update(n for n in (k_b, v_b) if n in self._file_names)
            return TensorMap(name, (kv_b,))

        def to_hf(parts: list[torch.Tensor]) -> torch.Tensor:
            kb, vb = parts  # [H, r, nope], [H, v, r]
            return torch.cat([kb.transpose(1, 2), vb], dim=1).reshape(heads * (nope + v), kb.shape[1])

        def from_hf(t: torch.Tensor) -> list[torch.Tensor]:
            kb, vb = t.reshape(heads, nope + v, t.shape[-1]).split([nope, v], dim=1)
            return [kb.transpose(1, 2).contiguous(), vb.contiguous()]

        return TensorMap(
            name,
            (k_b, v_b),
            to_hf=to_hf,
            from_hf=from_hf,
            file_shapes=lambda s: [(heads, s[1], nope), (heads, v, s[1])],
            raw_to_hf=None,  # k_b is stored transposed: its rows are not kv_b's rows
        )

    # -- checks ---------------------------------------------------------------------------------
    def check_files(
        self, file_shapes: Mapping[str, Shape], path: str, extra_ok: set[str] = frozenset()
    ) -> None:
        """Raise, naming the tensor, on a missing, unmapped or mis-shaped tensor."""
        used: set[str] = set()
        for tm in self.maps.values():
            for g in tm.gguf_names:
                if g not in file_shapes:
                    raise WeightMappingError(
                        f"{path}: tensor '{g}' (for HF parameter '{tm.hf_name}') is missing"
                    )
                used.add(g)
        unmapped = sorted(set(file_shapes) - used - set(extra_ok) - self.redundant)
        if unmapped:
            more = f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
            raise WeightMappingError(
                f"{path}: tensor(s) {', '.join(unmapped[:5])}{more} map to no parameter of the "
                f"'{type(self.config).__name__}' model built from this file's metadata"
            )

    def check_shape(self, tm: TensorMap, hf_shape: Shape, file_shapes: list[Shape], path: str) -> None:
        expected = [tuple(s) for s in tm.file_shapes(tuple(hf_shape))]
        if [tuple(s) for s in file_shapes] != expected:
            detail = ", ".join(f"'{g}' {tuple(s)}" for g, s in zip(tm.gguf_names, file_shapes))
            raise WeightMappingError(
                f"{path}: shape mismatch for HF parameter '{tm.hf_name}' {tuple(hf_shape)}: file has {detail}, "
                f"expected {', '.join(str(e) for e in expected)}"
            )
