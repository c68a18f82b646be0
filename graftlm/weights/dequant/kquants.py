"""The K-quants: 256-element super-blocks with 6- or 8-bit sub-block scales (Q2_K .. Q6_K).

Field offsets and the float32 operation order follow gguf-py's `quants.py`, so results match
`gguf.quants.dequantize` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as T

from .bits import byte_columns, column, f16_field, split_bits


def _q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    scales = byte_columns(blocks, 0, 16)
    dl = f16_field(blocks, 80).view(1, n) * (scales & 0x0F).to(torch.float32)
    ml = f16_field(blocks, 82).view(1, n) * (scales >> 4).to(torch.float32)
    q = split_bits(blocks[:, 16:80].reshape(n, 2, 32), 2).view(n, 16, 16)
    out.view(n, 16, 16).copy_(q).mul_(dl.t().unsqueeze(-1)).sub_(ml.t().unsqueeze(-1))


def _q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    packed = byte_columns(blocks, 96, 12)
    low = torch.cat((packed[0:8] & 0x0F, packed[0:8] >> 4))
    high = torch.cat([(packed[8:12] >> shift) & 3 for shift in (0, 2, 4, 6)])
    scales = low.bitwise_or_(high << 4).to(torch.float32) - 32.0
    dl = f16_field(blocks, 108).view(1, n) * scales
    low_bits = split_bits(blocks[:, 32:96].reshape(n, 2, 32), 2).view(n, 16, 16)
    high_bit = split_bits(blocks[:, 0:32], 1).view(n, 16, 16)
    # A clear high bit means "minus 4": q = low - 4 * (1 - high) = (low | high << 2) - 4.
    q = low_bits.bitwise_or_(high_bit.bitwise_left_shift_(2)).sub_(4).view(torch.int8)
    out.view(n, 16, 16).copy_(q).mul_(dl.t().unsqueeze(-1))


def _k4_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-32-element scale d * sc and offset dmin * m (Q4_K, Q5_K), as float32 views [n, 2, 4, 1].

    Twelve bytes pack eight 6-bit scales and eight 6-bit mins: bytes 0-3 hold scales 0-3, bytes 4-7
    mins 0-3, bytes 8-11 the low nibbles of scales and mins 4-7, whose top 2 bits are the top bits of
    bytes 0-7. Unpacked four bytes at a time from int32 columns, laid out [2, n, 4] so no operation
    runs over short rows.
    """
    n = blocks.shape[0]
    d, m, md = (column(blocks, start, torch.int32) for start in (4, 8, 12))
    sc = torch.stack((d & 0x3F3F3F3F, (md & 0x0F0F0F0F) | ((d >> 2) & 0x30303030)))
    mn = torch.stack((m & 0x3F3F3F3F, ((md >> 4) & 0x0F0F0F0F) | ((m >> 2) & 0x30303030)))
    sc = sc.view(torch.uint8).view(2, n, 4).to(torch.float32)
    mn = mn.view(torch.uint8).view(2, n, 4).to(torch.float32)
    dl = f16_field(blocks, 0).view(1, n, 1) * sc
    ml = f16_field(blocks, 2).view(1, n, 1) * mn
    return dl.permute(1, 0, 2).unsqueeze(-1), ml.permute(1, 0, 2).unsqueeze(-1)


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    dl, ml = _k4_scales(blocks)
    q = split_bits(blocks[:, 16:144].reshape(n, 4, 32), 4).view(n, 2, 4, 32)
    out.view(n, 2, 4, 32).copy_(q).mul_(dl).sub_(ml)


def _q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    dl, ml = _k4_scales(blocks)
    low = split_bits(blocks[:, 48:176].reshape(n, 4, 32), 4).view(n, 2, 4, 32)
    high = split_bits(blocks[:, 16:48], 1).view(n, 2, 4, 32)
    out.view(n, 2, 4, 32).copy_(low.bitwise_or_(high.bitwise_left_shift_(4))).mul_(dl).sub_(ml)


def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    scales = byte_columns(blocks, 192, 16).view(torch.int8).to(torch.float32)
    dl = f16_field(blocks, 208).view(1, n) * scales
    low = split_bits(blocks[:, 0:128].reshape(n, 2, 64), 4).view(n, 16, 16)
    high = split_bits(blocks[:, 128:192].reshape(n, 2, 32), 2).view(n, 16, 16)
    q = low.bitwise_or_(high.bitwise_left_shift_(4)).sub_(32).view(torch.int8)
    out.view(n, 16, 16).copy_(q).mul_(dl.t().unsqueeze(-1))


KERNELS: dict[T, Callable[[torch.Tensor, torch.Tensor], None]] = {
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
}
