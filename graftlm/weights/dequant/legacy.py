"""The 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each decoder repeats gguf-py's float32 operations in the same order (products, then offsets), so
results match `gguf.quants.dequantize` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as T

from .bits import f16_field, split_bits, spread_bits


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    return split_bits(qs, 4).view(qs.shape[0], 32)


def _five_bits(qh: torch.Tensor, qs: torch.Tensor, one: int, zero: int) -> torch.Tensor:
    """Low nibbles from `qs` [n, 16] OR-ed with a byte per bit of the little-endian uint32 `qh`."""
    return _nibbles(qs).bitwise_or_(spread_bits(qh, one, zero))


def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(blocks[:, 2:18]).sub_(8).view(torch.int8)
    out.copy_(q).mul_(f16_field(blocks, 0))


def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(blocks[:, 4:20])).mul_(f16_field(blocks, 0)).add_(f16_field(blocks, 2))


def _q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # q - 16 = nibble + (16 if the fifth bit is set else 0) - 16: OR-ing 0x00 or 0xF0 (-16 as int8)
    # into the nibble gives it as int8 directly.
    q = _five_bits(blocks[:, 2:6], blocks[:, 6:22], 0x00, 0xF0).view(torch.int8)
    out.copy_(q).mul_(f16_field(blocks, 0))


def _q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _five_bits(blocks[:, 4:8], blocks[:, 8:24], 0x10, 0x00)
    out.copy_(q).mul_(f16_field(blocks, 0)).add_(f16_field(blocks, 2))


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks[:, 2:34].view(torch.int8)).mul_(f16_field(blocks, 0))


KERNELS: dict[T, Callable[[torch.Tensor, torch.Tensor], None]] = {
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q8_0: _q8_0,
}
