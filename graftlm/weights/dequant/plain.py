"""Unquantized ggml types: floats and integers stored one element per `type_size` bytes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as T

from .bits import f16_into


def _float32(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.float32))


def _float16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    f16_into(blocks.view(torch.int16), out)


def _bfloat16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # bfloat16 -> float32 in torch is the plain 16-bit shift gguf-py does, NaN payloads included.
    out.copy_(blocks.view(torch.bfloat16))


KERNELS: dict[T, Callable[[torch.Tensor, torch.Tensor], None]] = {
    T.F32: _float32,
    T.F16: _float16,
    T.BF16: _bfloat16,
}

# Types gguf-py does not dequantize: they are cast straight to the requested dtype, with no float32
# stage, so an int64 or float64 request loses nothing.
NATIVE_DTYPES: dict[T, torch.dtype] = {
    T.F64: torch.float64,
    T.I8: torch.int8,
    T.I16: torch.int16,
    T.I32: torch.int32,
    T.I64: torch.int64,
}
