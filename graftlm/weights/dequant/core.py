"""`dequantize`: GGUF tensor bytes to a torch tensor, bit-identical to gguf-py.

Hot types are decoded by the torch kernels in this package, vectorized over all blocks of a chunk;
every other type gguf-py can dequantize goes through `gguf.quants.dequantize` (numpy, slower). Large
tensors are decoded in chunks of whole blocks so temporaries stay bounded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from graftlm.errors import GGUFFormatError, UnsupportedQuantType

from . import codebook, kquants, legacy, plain

logger = logging.getLogger(__name__)

# A kernel decodes uint8 blocks [n, type_size] into a float32 tensor [n, block_size] it is given.
Kernel = Callable[[torch.Tensor, torch.Tensor], None]

TORCH_KERNELS: dict[GGMLQuantizationType, Kernel] = {
    **plain.KERNELS,
    **legacy.KERNELS,
    **kquants.KERNELS,
    **codebook.KERNELS,
}

# What `dequantize` accepts as a tensor's stored bytes.
TensorBytes = np.ndarray | torch.Tensor | bytes | bytearray | memoryview

# Output elements decoded at once. Each chunk's temporaries are a few times this in float32.
CHUNK_ELEMENTS = 1 << 22


def _numpy_dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf-py's quants module can dequantize `qtype` (probed on one all-zero block)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


NUMPY_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    t for t in GGMLQuantizationType if t not in TORCH_KERNELS and _numpy_dequantizable(t)
)
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = (
    frozenset(TORCH_KERNELS) | frozenset(plain.NATIVE_DTYPES) | NUMPY_TYPES
)


def is_supported(qtype: GGMLQuantizationType | int) -> bool:
    """Whether `dequantize` can decode tensors stored as `qtype`."""
    try:
        return GGMLQuantizationType(qtype) in SUPPORTED_TYPES
    except ValueError:
        return False


@cache
def _note_numpy_path(qtype: GGMLQuantizationType) -> None:
    logger.info("%s tensors are dequantized by gguf-py's numpy code, the slower path", qtype.name)


def _qtype_name(qtype: Any) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"unknown ggml type {qtype!r}"


def _flat_bytes(data: TensorBytes, name: str) -> np.ndarray | torch.Tensor:
    """The raw bytes of `data` as a flat uint8 array or tensor, without copying where possible."""
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    if not isinstance(data, np.ndarray):
        raise GGUFFormatError(
            f"tensor {name!r}: data is a {type(data).__name__}, not a numpy array or torch tensor"
        )
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _chunk(flat: np.ndarray | torch.Tensor, start: int, stop: int, type_size: int) -> torch.Tensor:
    """Bytes [start, stop) as a fresh uint8 tensor of blocks (the source may be read-only or shared)."""
    if isinstance(flat, torch.Tensor):
        piece = flat[start:stop].clone()
    else:
        piece = torch.from_numpy(np.array(flat[start:stop], copy=True))
    return piece.view(-1, type_size)


def _blocks_per_chunk(block_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // block_size)


def _chunks(n_blocks: int, block_size: int) -> Iterator[tuple[int, int]]:
    step = _blocks_per_chunk(block_size)
    for first in range(0, n_blocks, step):
        yield first, min(n_blocks, first + step)


def _decoder(qtype: GGMLQuantizationType) -> Kernel:
    kernel = TORCH_KERNELS.get(qtype)
    if kernel is not None:
        return kernel
    native = plain.NATIVE_DTYPES.get(qtype)
    if native is not None:

        def cast(blocks: torch.Tensor, out: torch.Tensor) -> None:
            out.copy_(blocks.view(native))

        return cast
    _note_numpy_path(qtype)

    def numpy_path(blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype)))

    return numpy_path


def _check_layout(name: str, qtype: GGMLQuantizationType, shape: tuple[int, ...], n_bytes: int) -> int:
    """Validate shape against the byte count; return the number of blocks."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    where = f"tensor {name!r} ({qtype.name}, shape {list(shape)})"
    if any(dim < 0 for dim in shape):
        raise GGUFFormatError(f"{where}: negative dimension")
    if block_size > 1 and (not shape or shape[-1] % block_size):
        raise GGUFFormatError(f"{where}: the last dimension is not a multiple of the block size {block_size}")
    n_blocks = math.prod(shape) // block_size
    if n_blocks * type_size != n_bytes:
        raise GGUFFormatError(
            f"{where}: expected {n_blocks * type_size} bytes ({n_blocks} blocks of {type_size}), got {n_bytes}"
        )
    return n_blocks


def dequantize(
    data: TensorBytes,
    qtype: GGMLQuantizationType,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    name: str = "<tensor>",
) -> torch.Tensor:
    """Decode a GGUF tensor's stored bytes into a tensor of `shape` (torch order) and `dtype`.

    `data` is what `gguf.GGUFReader` gives (a numpy array, possibly memory-mapped and read-only;
    it is never written to), a torch tensor, or a bytes-like object; only its total byte count must
    match `shape`. Values equal `gguf.quants.dequantize` bit for bit in float32 and are then cast to
    `dtype`; F64 and integer types are cast straight to `dtype`.
    """
    if not is_supported(qtype):
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise UnsupportedQuantType(
            f"tensor {name!r} is stored as {_qtype_name(qtype)}, which graftlm cannot dequantize "
            f"(supported: {supported})"
        )
    qtype = GGMLQuantizationType(qtype)
    shape = tuple(int(dim) for dim in shape)
    flat = _flat_bytes(data, name)
    n_blocks = _check_layout(name, qtype, shape, int(flat.shape[0]))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    decode = _decoder(qtype)

    out = torch.empty(n_blocks * block_size, dtype=dtype)
    # Kernels write float32; another dtype goes through a float32 buffer reused across chunks.
    via_float32 = dtype != torch.float32 and qtype not in plain.NATIVE_DTYPES
    scratch = None
    if via_float32:
        scratch = torch.empty(
            min(_blocks_per_chunk(block_size) * block_size, out.numel()), dtype=torch.float32
        )
    for first, last in _chunks(n_blocks, block_size):
        target = out[first * block_size : last * block_size]
        buffer = target if scratch is None else scratch[: target.numel()]
        decode(_chunk(flat, first * type_size, last * type_size, type_size), buffer.view(-1, block_size))
        if scratch is not None:
            target.copy_(buffer)
    return out.view(shape)
