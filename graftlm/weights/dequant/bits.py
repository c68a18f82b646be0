"""Torch helpers shared by the block decoders.

A decoder takes a uint8 tensor of whole blocks, [n_blocks, type_size], and fills a float32 output
[n_blocks, block_size]. Fields are unpacked a 64-bit word at a time (eight bytes per element
operation) into uint8 codes laid out in output order; the float stage then is one conversion and
the scale arithmetic, done in place in the output.
"""

from __future__ import annotations

from functools import cache

import torch


def f16_to_f32(raw: torch.Tensor) -> torch.Tensor:
    """float16 bits (an int16 tensor) widened to float32 exactly as numpy does it.

    torch turns every NaN into one canonical NaN; numpy keeps sign and payload. NaNs are rare, so
    they are patched afterwards, only where present.
    """
    values = raw.view(torch.float16).to(torch.float32)
    return _numpy_nans(raw, values)


def f16_into(raw: torch.Tensor, out: torch.Tensor) -> None:
    """`f16_to_f32`, written into a float32 tensor of the same shape."""
    out.copy_(raw.view(torch.float16))
    if bool((raw & 0x7FFF).amax() > 0x7C00):
        out.copy_(_numpy_nans(raw, out))


def _numpy_nans(raw: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    nan = values.isnan()
    if not bool(nan.any()):
        return values
    h = raw.to(torch.int32)
    numpy_nan = ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x03FF) << 13)
    return torch.where(nan, numpy_nan.view(torch.float32), values)


def as_words(packed: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """Bytes [n, k] reinterpreted as [n, k / word size] words, copied first unless already laid out so."""
    size = torch.empty((), dtype=word).element_size()
    if not packed.is_contiguous() or packed.storage_offset() % size:
        packed = packed.clone(memory_format=torch.contiguous_format)
    return packed.view(word)


def f16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian float16 at byte `start` of each block, as float32 of shape [n, 1]."""
    return f16_to_f32(as_words(blocks[:, start : start + 2], torch.int16))


_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _repeat_byte(byte: int, size: int) -> int:
    return int.from_bytes(bytes([byte]) * size, "little")


def split_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Split bytes [..., k] into `width`-bit fields [..., 8 // width, k] (uint8).

    Plane p holds bits [p * width, (p + 1) * width) of every byte: for width 4, all low nibbles and
    then all high nibbles, which is how ggml lays out its quants.
    """
    *lead, k = packed.shape
    size, word = next((s, w) for s, w in _WORDS if k % s == 0)
    words = as_words(packed.reshape(-1, k), word)
    mask = _repeat_byte((1 << width) - 1, size)
    planes = 8 // width
    out = torch.empty((words.shape[0], planes, words.shape[1]), dtype=word)
    for p in range(planes):
        plane = out[:, p]
        torch.bitwise_right_shift(words, p * width, out=plane)
        plane.bitwise_and_(mask)
    return out.view(torch.uint8).view(*lead, planes, k)


@cache
def _spread_table() -> torch.Tensor:
    """For each byte value, eight bytes holding its bits 0..7 (as 0 or 1), packed in an int64."""
    b = torch.arange(256, dtype=torch.int64)
    table = torch.zeros(256, dtype=torch.int64)
    for bit in range(8):
        table |= ((b >> bit) & 1) << (8 * bit)
    return table


def spread_bits(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., k] to their bits [..., 8 * k] (uint8 0/1), bit i of byte j at position 8 * j + i."""
    *lead, k = packed.shape
    index = packed.reshape(-1).to(torch.int32)
    return torch.index_select(_spread_table(), 0, index).view(torch.uint8).view(*lead, 8 * k)


def lookup_into(table: torch.Tensor, codes: torch.Tensor, out: torch.Tensor) -> None:
    """out = table[codes], for a small 1-D float32 table and integer codes of out's shape."""
    torch.index_select(table, 0, codes.reshape(-1).to(torch.int32), out=out.view(-1))
