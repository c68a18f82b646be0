"""The WeightSource protocol: the only seam that knows file formats.

Operators ask a source for a tensor by its Hugging Face parameter name, either dequantized
(`get`) or as the raw quantized blocks it is stored in (`raw`). Names, stacking of per-expert
tensors and layout transforms live behind this seam (see `names.py`); nothing downstream
re-parses a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from gguf import GGMLQuantizationType


@dataclass(frozen=True)
class QuantizedTensor:
    """One tensor as a file stores it.

    `shape` is the logical shape in torch order (for a linear weight, [out_features, in_features];
    for stacked experts, [n_experts, out, in]). `data` holds the raw bytes, memory-mapped where the
    format allows, shaped [*shape[:-1], bytes_per_row].
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@runtime_checkable
class WeightSource(Protocol):
    """A model's weights, addressed by Hugging Face parameter name."""

    path: str

    def names(self) -> list[str]:
        """Every HF parameter name this source can produce."""
        ...

    def has(self, hf_name: str) -> bool: ...

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """The HF parameter's shape, without reading data."""
        ...

    def get(
        self, hf_name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """The parameter in HF layout, dequantized to `dtype` on `device`."""
        ...

    def raw(self, hf_name: str) -> list[QuantizedTensor]:
        """The file tensors the parameter is made of, undecoded (one, or several for fused HF parameters)."""
        ...
