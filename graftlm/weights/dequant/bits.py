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


_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _viewable(packed: torch.Tensor, size: int) -> bool:
    """Whether uint8 `packed` can be reinterpreted as `size`-byte words without a copy."""
    return (
        packed.shape[-1] % size == 0
        and packed.stride(-1) == 1
        and packed.storage_offset() % size == 0
        and all(stride % size == 0 for stride in packed.stride()[:-1])
    )


def as_words(packed: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """Bytes [..., k] reinterpreted as [..., k / word size] words, copied first if they must be."""
    if not _viewable(packed, word.itemsize):
        packed = packed.clone(memory_format=torch.contiguous_format)
    return packed.view(word)


def widest_words(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., k] as int64 words when k allows (copied if they must be), else the widest in place.

    Unpacking touches every word in a strided loop, so one byte copy to get 8-byte words is cheaper
    than unpacking 2-byte words in place (measured on Q6_K and Q4_0 blocks).
    """
    if packed.shape[-1] % 8 == 0:
        return as_words(packed, torch.int64)
    for size, word in _WORDS[1:-1]:
        if _viewable(packed, size):
            return packed.view(word)
    size, word = next((s, w) for s, w in _WORDS if packed.shape[-1] % s == 0)
    return as_words(packed, word)


def column(blocks: torch.Tensor, start: int, word: torch.dtype) -> torch.Tensor:
    """The `word` at byte `start` of every block [n, type_size], as a 1-D (strided) tensor [n]."""
    size = word.itemsize
    if start % size == 0 and _viewable(blocks, size):
        return blocks.view(word)[:, start // size]
    return as_words(blocks[:, start : start + size], word)[:, 0]


def byte_columns(blocks: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Bytes [start, start + count) of every block, transposed to a contiguous [count, n].

    Small per-block fields (sub-block scales) are unpacked in this layout, where every operation
    runs along n instead of over millions of few-byte rows.
    """
    columns = torch.empty((count, blocks.shape[0]), dtype=torch.uint8)
    return columns.copy_(blocks[:, start : start + count].t())


def f16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian float16 at byte `start` of each block, as float32 of shape [n, 1]."""
    return f16_to_f32(column(blocks, start, torch.int16)).unsqueeze(1)


def _repeat_byte(byte: int, size: int) -> int:
    return int.from_bytes(bytes([byte]) * size, "little")


def split_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Split bytes [..., k] into `width`-bit fields [..., 8 // width, k] (uint8).

    Plane p holds bits [p * width, (p + 1) * width) of every byte: for width 4, all low nibbles and
    then all high nibbles, which is how ggml lays out its quants.
    """
    *lead, k = packed.shape
    words = widest_words(packed)
    mask = _repeat_byte((1 << width) - 1, words.dtype.itemsize)
    planes = 8 // width
    out = torch.empty((*lead, planes, words.shape[-1]), dtype=words.dtype)
    # Shifting is cheap; the one strided write per plane is the masking.
    for p in range(planes):
        shifted = words >> (p * width) if p else words
        torch.bitwise_and(shifted, mask, out=out[..., p, :])
    return out.view(torch.uint8).view(*lead, planes, k)


@cache
def _spread_table(one: int, zero: int) -> torch.Tensor:
    """For each byte value, eight bytes: `one` where its bit 0..7 is set, `zero` where clear."""
    b = torch.arange(256, dtype=torch.int64)
    table = torch.zeros(256, dtype=torch.int64)
    for bit in range(8):
        byte = torch.where(((b >> bit) & 1) == 1, one, zero)
        table |= byte << (8 * bit)
    return table


def spread_bits(packed: torch.Tensor, one: int = 1, zero: int = 0) -> torch.Tensor:
    """Bytes [..., k] to one byte per bit [..., 8 * k]: bit i of byte j at position 8 * j + i.

    The byte is `one` for a set bit and `zero` for a clear one, so a shift or an offset can be
    folded into the lookup.
    """
    *lead, k = packed.shape
    index = packed.reshape(-1).to(torch.int32)
    return torch.index_select(_spread_table(one, zero), 0, index).view(torch.uint8).view(*lead, 8 * k)


def lookup_into(table: torch.Tensor, codes: torch.Tensor, out: torch.Tensor) -> None:
    """out = table[codes], for a small 1-D float32 table and integer codes of out's shape."""
    torch.index_select(table, 0, codes.reshape(-1).to(torch.int32), out=out.view(-1))
