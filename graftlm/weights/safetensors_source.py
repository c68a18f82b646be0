"""WeightSource over an HF safetensors folder (single file or sharded with an index).

Checkpoints keep experts one tensor per expert (`mlp.experts.3.gate_proj.weight`, or Mixtral's
`block_sparse_moe.experts.3.w1.weight`); transformers 5 fuses them into `mlp.experts.gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I]. The stacking hook below serves the fused names.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from graftlm.errors import GraftError, WeightMappingError
from graftlm.weights.source import QuantizedTensor


class SafetensorsSource:
    """Tensors by HF name, read lazily (safetensors memory-maps each file)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = str(self.folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise GraftError(f"{self.folder}: no *.safetensors files")
        self._handles = {f: safe_open(str(self.folder / f), framework="pt") for f in files}
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                self._where[_RENAME.sub(_renamed, k)] = f"{f}\0{k}"
        self._fused = _fused_experts(self._where)

    def names(self) -> list[str]:
        return [n for n in self._where if not _PER_EXPERT.search(n)] + list(self._fused)

    def has(self, hf_name: str) -> bool:
        return hf_name in self._fused or hf_name in self._where

    def _stored(self, hf_name: str) -> tuple:
        if hf_name not in self._where:
            raise WeightMappingError(f"{self.path}: no tensor '{hf_name}' in the safetensors files")
        file, key = self._where[hf_name].split("\0")
        return self._handles[file], key

    def shape(self, hf_name: str) -> tuple[int, ...]:
        if hf_name in self._fused:
            parts, combine = self._fused[hf_name]
            with torch.device("meta"):
                return tuple(combine([torch.empty(self.shape(p)) for p in parts]).shape)
        handle, key = self._stored(hf_name)
        return tuple(handle.get_slice(key).get_shape())

    def get(
        self, hf_name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        if hf_name in self._fused:
            parts, combine = self._fused[hf_name]
            return combine([self.get(p, dtype) for p in parts]).to(device)
        handle, key = self._stored(hf_name)
        return handle.get_tensor(key).to(device=device, dtype=dtype)

    def raw(self, hf_name: str) -> list[QuantizedTensor]:
        raise WeightMappingError(
            f"{self.path}: '{hf_name}' is a plain safetensors tensor, not quantized blocks; use get()"
        )

    def check_shapes(self, hf_shapes: dict[str, tuple[int, ...]]) -> None:
        missing = sorted(n for n in hf_shapes if not self.has(n))
        if missing:
            raise WeightMappingError(f"{self.path}: missing tensor(s) {', '.join(missing[:5])}")
        for name, shape in hf_shapes.items():
            if self.shape(name) != tuple(shape):
                raise WeightMappingError(
                    f"{self.path}: tensor '{name}' has shape {self.shape(name)}, the model expects {tuple(shape)}"
                )


# Mixtral's checkpoint names -> transformers 5 module names.
_RENAME = re.compile(r"block_sparse_moe\.|(?<=experts\.)(\d+)\.w([123])\.")
_W = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _renamed(m: re.Match) -> str:
    return "mlp." if m.group(0) == "block_sparse_moe." else f"{m.group(1)}.{_W[m.group(2)]}."


def _fused_experts(names) -> dict[str, tuple[list[str], Callable[[list[torch.Tensor]], torch.Tensor]]]:
    """Fused expert names -> (per-expert tensor names, how to combine them)."""
    groups: dict[str, set[int]] = defaultdict(set)
    for n in names:
        if m := _PER_EXPERT.match(n):
            groups[m.group(1)].add(int(m.group(2)))
    fused = {}
    for prefix, ids in groups.items():
        n = len(ids)
        if ids != set(range(n)):
            raise WeightMappingError(f"{prefix}: expert indices are not 0..{n - 1}: {sorted(ids)[:8]}")
        gate = [f"{prefix}.{i}.gate_proj.weight" for i in range(n)]
        up = [f"{prefix}.{i}.up_proj.weight" for i in range(n)]
        down = [f"{prefix}.{i}.down_proj.weight" for i in range(n)]
        fused[f"{prefix}.gate_up_proj"] = (
            gate + up,
            lambda t, n=n: torch.stack([torch.cat([t[i], t[n + i]]) for i in range(n)]),
        )
        fused[f"{prefix}.down_proj"] = (down, torch.stack)
    return fused
