"""WeightSource over a GGUF file: HF names in, dequantized tensors or raw blocks out."""

from __future__ import annotations

import logging

import torch

from graftlm.errors import WeightMappingError
from graftlm.weights.dequant import dequantize
from graftlm.weights.gguf_file import GGUFFile
from graftlm.weights.names import NameTable
from graftlm.weights.source import QuantizedTensor

log = logging.getLogger(__name__)

# File tensors that are not HF parameters but are consumed by a load hook.
_HOOK_TENSORS = ("rope_freqs.weight",)


class GGUFSource:
    """A GGUF file seen through the name table of the model it is loaded into."""

    def __init__(self, file: GGUFFile, table: NameTable):
        self.file = file
        self.path = file.path
        self.table = table
        # ggml dims past the last one above 1 are 1 implicitly: [N] and [N, 1] are one tensor, and
        # converters write either (llama.cpp's Qwen2-MoE shared-expert gate is [H, 1], graftlm's [H]).
        # A file tensor that differs from the expected shape only there is read in the expected shape.
        self._shapes: dict[str, tuple[int, ...]] = {}
        file_shapes = {n: file.shape(n) for n in file.tensors}
        table.check_files(file_shapes, self.path, extra_ok={n for n in _HOOK_TENSORS if n in file_shapes})

    def names(self) -> list[str]:
        return list(self.table.maps)

    def has(self, hf_name: str) -> bool:
        return hf_name in self.table.maps

    def _map(self, hf_name: str):
        try:
            return self.table.maps[hf_name]
        except KeyError:
            raise WeightMappingError(f"{self.path}: no tensor for HF parameter '{hf_name}'") from None

    def shape(self, hf_name: str) -> tuple[int, ...]:
        tm = self._map(hf_name)
        with torch.device("meta"):
            parts = [torch.empty(self._file_shape(g)) for g in tm.gguf_names]
            return tuple(tm.to_hf(parts).shape)

    def raw(self, hf_name: str) -> list[QuantizedTensor]:
        tm = self._map(hf_name)
        return [self.file_tensor(g) for g in tm.gguf_names]

    def raw_hf(self, hf_name: str) -> QuantizedTensor | None:
        """The parameter as quantized blocks in HF row order, when its layout only moves whole rows
        and its file tensors share one type; None otherwise (then use `get`)."""
        tm = self._map(hf_name)
        parts = self.raw(hf_name)
        if tm.raw_to_hf is None or len({p.qtype for p in parts}) != 1:
            return None
        data = tm.raw_to_hf([p.data for p in parts])  # zero-copy for the identity map
        return QuantizedTensor(hf_name, parts[0].qtype, self.shape(hf_name), data)

    def _file_shape(self, gguf_name: str) -> tuple[int, ...]:
        return self._shapes.get(gguf_name) or self.file.shape(gguf_name)

    def file_tensor(self, gguf_name: str) -> QuantizedTensor:
        t = self.file.tensors[gguf_name]
        return QuantizedTensor(gguf_name, self.file.qtype(gguf_name), self._file_shape(gguf_name), t.data)

    def get(
        self, hf_name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        tm = self._map(hf_name)
        # Dequantize in fp32 first: HF-layout transforms (Gemma's norm offset) must see exact values.
        parts = [self.dequantized(g) for g in tm.gguf_names]
        return tm.to_hf(parts).to(device=device, dtype=dtype).contiguous()

    def dequantized(self, gguf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.file_tensor(gguf_name)
        return dequantize(q.data, q.qtype, q.shape, dtype, name=f"{self.path}: {gguf_name}")

    def check_shapes(self, hf_shapes: dict[str, tuple[int, ...]]) -> None:
        for hf_name, hf_shape in hf_shapes.items():
            tm = self._map(hf_name)
            for g, want in zip(tm.gguf_names, tm.file_shapes(tuple(hf_shape))):
                have = self.file.shape(g)
                if have != tuple(want) and _ggml_dims(have) == _ggml_dims(want):
                    self._shapes[g] = tuple(want)
            self.table.check_shape(tm, hf_shape, [self._file_shape(g) for g in tm.gguf_names], self.path)


def _ggml_dims(shape) -> tuple[int, ...]:
    """A torch-order shape without its leading 1s: ggml's ne without the trailing ones it implies."""
    dims = tuple(int(d) for d in shape)
    while len(dims) > 1 and dims[0] == 1:
        dims = dims[1:]
    return dims
