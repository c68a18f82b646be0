"""Valid GGUF blocks of any type, for tests (and bench/qblocks.py): gguf-py's quantizer where it has one,
else random bytes with finite, moderate float16 scales."""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

# gguf-py can produce valid blocks of these from floats.
QUANTIZABLE = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.TQ1_0, T.TQ2_0, T.MXFP4}
# Byte offsets of the float16 scales in each block, from ggml's block structs.
F16_SCALES = {
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,),
    T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,), T.NVFP4: (),
}  # fmt: skip


def random_blocks(
    qtype: T, rows: int, cols: int, rng: np.random.Generator, scales: tuple[float, float] = (-1.0, 1.0)
) -> np.ndarray:
    """Valid stored bytes [rows, bytes_per_row] (or typed values) with finite, moderate scales, drawn
    uniformly from `scales` where the blocks are random bytes."""
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_size * type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    for offset in F16_SCALES.get(qtype, ()):
        halves = rng.uniform(*scales, size=(blocks.shape[0], 1)).astype(np.float16)
        blocks[:, offset : offset + 2] = halves.view(np.uint8)
    if qtype == T.IQ1_M:
        # Its float16 scale is spread over the top nibbles of four uint16s; clearing bit 14 of it
        # (bit 6 of byte 55) keeps the exponent below 31, so it is finite.
        blocks[:, 55] &= 0xBF
    return raw
