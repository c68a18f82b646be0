"""Types whose values come from a fixed table or trit packing: IQ4_NL, IQ4_XS, MXFP4, NVFP4, TQ1_0, TQ2_0.

Tables hold exactly the float32 values gguf-py computes; products are taken in the same order, so
results match `gguf.quants.dequantize` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .bits import as_words, f16_field, lookup_into, split_bits

_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# e2m1 values, doubled (the block scale carries the matching factor 1/2).
_FP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@cache
def _table(values: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@cache
def _e8m0_half_table() -> torch.Tensor:
    """float32 of 2**(e - 128) for every e8m0 byte e, as ggml_e8m0_to_fp32_half computes it."""
    e = np.arange(256, dtype=np.uint32)
    raw = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23)).astype(np.uint32)
    return torch.from_numpy(raw.view(np.float32).copy())


@cache
def _ue4m3_half_table() -> torch.Tensor:
    """Unsigned e4m3 (bias 7) to float32, times 1/2, for every byte: gguf-py's NVFP4.ue4m3_to_fp32."""
    x = np.arange(256, dtype=np.uint8)
    exp = (x >> 3).astype(np.int32) & 0xF
    man = (x & 0x7).astype(np.float32)
    raw = np.where(exp == 0, man * 2**-9, (1.0 + man / 8.0) * (2.0 ** (exp.astype(np.float32) - 7)))
    value = np.where((x == 0) | (x == 0x7F), 0.0, raw * 0.5).astype(np.float32)
    return torch.from_numpy(value)


def _iq4_nl(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    lookup_into(_table(_IQ4_VALUES), split_bits(blocks[:, 2:18], 4).view(n, 32), out)
    out.mul_(f16_field(blocks, 0))


def _iq4_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    scales_h = as_words(blocks[:, 2:4], torch.int16).to(torch.int32)
    high = (scales_h >> torch.arange(0, 16, 2, dtype=torch.int32)) & 3
    low = split_bits(blocks[:, 4:8], 4).transpose(1, 2).reshape(n, 8)
    scales = (low.to(torch.int32) | (high << 4)).to(torch.float32) - 32.0
    dl = (f16_field(blocks, 0) * scales).view(n, 8, 1)
    codes = split_bits(blocks[:, 8:136].reshape(n, 8, 16), 4).view(n, 8, 32)
    lookup_into(_table(_IQ4_VALUES), codes, out)
    out.view(n, 8, 32).mul_(dl)


def _mxfp4(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d = torch.index_select(_e8m0_half_table(), 0, blocks[:, 0].to(torch.int32)).view(n, 1)
    lookup_into(_table(_FP4_VALUES), split_bits(blocks[:, 1:17], 4).view(n, 32), out)
    out.mul_(d)


def _nvfp4(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d = torch.index_select(_ue4m3_half_table(), 0, blocks[:, 0:4].reshape(-1).to(torch.int32))
    codes = split_bits(blocks[:, 4:36].reshape(n, 4, 8), 4).view(n, 4, 16)
    lookup_into(_table(_FP4_VALUES), codes, out)
    out.view(n, 4, 16).mul_(d.view(n, 4, 1))


def _tq1_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)
    # Each byte holds 5 (or 4) trits as a fixed-point fraction of 3**5; multiplying by 3**k (mod 256)
    # brings trit k to the top, and (x * 3) >> 8 reads it.
    qs0 = blocks[:, 0:32].to(torch.int16).unsqueeze(1) * powers.view(5, 1)
    qs1 = blocks[:, 32:48].to(torch.int16).unsqueeze(1) * powers.view(5, 1)
    qh = blocks[:, 48:52].to(torch.int16).unsqueeze(1) * powers[:4].view(4, 1)
    x = torch.cat((qs0.reshape(n, 160), qs1.reshape(n, 80), qh.reshape(n, 16)), dim=1) & 0xFF
    out.copy_(((x * 3) >> 8) - 1).mul_(f16_field(blocks, 52))


def _tq2_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    q = split_bits(blocks[:, 0:64].reshape(n, 2, 32), 2).view(n, 256).sub_(1).view(torch.int8)
    out.copy_(q).mul_(f16_field(blocks, 64))


KERNELS: dict[T, Callable[[torch.Tensor, torch.Tensor], None]] = {
    T.IQ4_NL: _iq4_nl,
    T.IQ4_XS: _iq4_xs,
    T.MXFP4: _mxfp4,
    T.NVFP4: _nvfp4,
    T.TQ1_0: _tq1_0,
    T.TQ2_0: _tq2_0,
}
