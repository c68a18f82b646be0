"""GGUF weight matrices repacked, once at load, into layouts torch has fast CPU kernels for.

| GGUF type            | layout            | decode kernel (few rows)         | prefill kernel (many rows)        |
|----------------------|-------------------|----------------------------------|-----------------------------------|
| Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, where graftlm._qkernels is built | `gguf`: the GGUF blocks themselves, no copy | graftlm's C kernel on the blocks, activations int8 per block of 32 (256 for K-quants; graftlm/kernels/cpu/qblocks.py) | where the CPU has AMX, the int8 tile kernel on the blocks up to `QBLOCK_AMX_ROWS` (64-256 rows, activations int8 per 32); where it also has AMX-BF16, that kernel only to `QBLOCK_AMX_INT8_ROWS` (6-12 rows) and the bf16 tile kernel above (the blocks dequantized to bf16 into the core's cache, a unit of rows at a time); elsewhere above, `F.linear` on the blocks dequantized a slice at a time (as gguf-py does), in `gemm_dtype()` |
| Q4_0, Q4_1, Q4_K     | `int4` group 32   | `_weight_int4pack_mm_for_cpu`    | the same                          |
| other quantized types| `int8` per row    | `_weight_int8pack_mm`            | `F.linear` on the int8 weights dequantized a slice at a time, in bf16 where the CPU has native bf16 (AVX-512 BF16, AMX), else fp32; with `int8_activations`, `torch._int_mm` (AMX/VNNI) on int8 activations per row |
| F16, BF16            | `bf16`            | `F.linear`                       | `F.linear`                        |
| F32                  | `f32` (exact)     | `F.linear`                       | `F.linear`                        |

Error bounds against dequantize-then-fp32 (tested in tests/kernels/test_packed.py and, for `gguf`,
tests/kernels/test_qblocks.py):
- `gguf`: weights exact; C-kernel products round each block of 32 activations (256 for K-quants) to
  int8 with scale d = max|x|/127 (|error| <= sum over blocks of d/2 * sum |w|); many-row products exact in fp32
  (bf16 activations where `gemm_dtype()` is bf16); the bf16 tile kernel: weights as `dequantize(...,
  bf16)` rounds them, activations rounded to bf16, sums in fp32 (the same as the bf16 GEMM path).
- `int4`: lossless in the 4-bit values; each group's scale and zero are rounded to bf16, a relative
  error of at most 2^-9 on each, and activations are rounded to bf16 (2^-9 relative).
- `int8`: each row is requantized to int8 with scale max|w|/127: an absolute error of at most half
  that scale per weight (Q8_0's own step is d/2 per block: about the same when block scales are even).
- the opt-in `_int_mm` prefill also rounds activations to int8 per row (scale max|x|/127).
The quantized and bf16 kernels take bf16 activations (fp32 makes the weight-only kernels 6-36x
slower here); every layout returns fp32.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from graftlm.kernels.cpu import qblocks
from graftlm.weights.dequant import dequantize
from graftlm.weights.source import QuantizedTensor

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
GROUP = 32
# Above this many rows, int8 matrices leave the weight-only kernel for a GEMM (prefill): the
# weights dequantized a slice at a time (int8 values are exact in bf16 and fp32), or the opt-in
# int8 x int8 GEMM. Where the GEMM overtakes `_weight_int8pack_mm`: `python bench/int8_prefill.py`
# (AMD AVX2 machine: at ~16 rows; BENCHMARKS.md).
PREFILL_ROWS = 16
# Up to this many rows, `gguf` matrices run the C kernel on their blocks; above, a sliced GEMM of
# dequantized weights. `python bench/qblocks.py` times both (bench/results/qblocks-20261130-1154.md,
# AMD AVX2 machine, 2 threads, expert-sized matrices): the C kernel runs Q4_K/Q6_K at 102-147 GOPS,
# the dequantize + fp32 GEMM path 4-159, ahead only at 512 rows (by up to 12%), so K-quants always
# take the kernel; Q5_0/Q8_0 run at 79-100 GOPS and fall behind between 48 and 128 rows. Where the CPU
# has native bf16 (AMX: ~890 GFLOP/s per core for oneDNN's bf16 GEMM on the Intel machine, as issue 4
# records), the blocks are dequantized straight to bf16 (AVX2, 3.5-5.8 G weights/s on two threads) and the
# GEMM overtakes the kernel sooner; where, per type, on the Intel AMX machine, 2 threads
# (bench/qblocks.py, 2026-11-30 19:25): Q8_0 at ~14 rows, Q5_0 ~16, Q4_K ~19, Q6_K ~23. Others: 16.
QBLOCK_ROWS = 32
QBLOCK_ROWS_NATIVE_BF16 = {Q.Q8_0: 14, Q.Q5_0: 16, Q.Q5_1: 16, Q.Q4_K: 20, Q.Q5_K: 20, Q.Q6_K: 24}
# Where the tile kernel runs (qblocks.amx), per type: (the most rows for the one-row C kernel, the most
# for the tile kernel); more rows take the dequantize + bf16 GEMM path. From timing all three on the
# Intel AMX machine, 2 threads, expert-sized matrices (2816 x 2048 and 2048 x 1280-1536; `python
# bench/qblocks.py` times each type at these bounds: bench/results/qblocks-20261130-2300.md, and
# bench/results/qblocks-20261201-0403.md after dequantization to bf16 took AVX-512 BF16 and Q6_K
# got a tile path): the tile kernel leads from 8 rows (4 for Q4_1/Q5_1), by 2-3x at 16-64 rows (a
# routed expert's share of a prefill), and falls behind the GEMM somewhere past 64-256 rows, where
# scaling every block's product on the vector units costs more than dequantizing. The faster
# dequantization moved Q4_K's crossing from ~256 to ~128 rows in that run and in a separate check;
# Q4_0's and Q8_0's moved in one and not in the other, so they stay. Q6_K's scales cover 16 values,
# so its tile path makes two products per block of 32 and gives way soonest (~64 rows).
QBLOCK_AMX_ROWS = {
    Q.Q4_0: (4, 192),
    Q.Q4_1: (2, 128),
    Q.Q5_0: (4, 192),
    Q.Q5_1: (2, 128),
    Q.Q8_0: (4, 160),
    Q.Q4_K: (4, 128),
    Q.Q5_K: (4, 192),
    Q.Q6_K: (6, 64),
}
# Where the CPU also has AMX-BF16 (qblocks.amx_bf16), rows above the one-row kernel's bound take the
# int8 tile kernel only up to these many, and the bf16 tile kernel above: at every row count up to 512,
# in every type but Q5_1 at 512 rows (0.88x), it was ahead of the dequantize + bf16 GEMM path it replaces
# (1.01-2.2x), and since its
# dequantization got faster it overtakes the int8 tile kernel from 8 rows (Q4_1, Q5_1, Q5_K, Q6_K: no
# int8 tiles; Q4_0 past 6) to ~12 (Q4_K, Q5_0, Q8_0) (`python bench/amx_bf16.py`; Intel AMX machine, 2
# threads: bench/results/amx_bf16-20261201.md).
QBLOCK_AMX_INT8_ROWS = {Q.Q4_0: 6, Q.Q5_0: 10, Q.Q8_0: 12, Q.Q4_K: 10}
K_QUANTS = frozenset({Q.Q4_K, Q.Q5_K, Q.Q6_K})
GEMM_SLICE_BYTES = 64 << 20  # dequantized weight held at once by the many-row int8 path

INT4_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K})
HALF_TYPES = frozenset({Q.F16, Q.BF16})


def _f16(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).astype(np.float32))


def q4_groups(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit values [N, K] (0..15) and per-group-of-32 scale and zero [N, K/32] so that
    w = (v - 8) * scale + zero exactly (in fp32)."""
    n, k = q.shape
    blocks = np.ascontiguousarray(q.data).reshape(n, -1)
    if q.qtype == Q.Q4_K:
        b = blocks.reshape(n, k // 256, 144)
        d = _f16(b[..., 0:2])[..., 0]
        dmin = _f16(b[..., 2:4])[..., 0]
        s = torch.from_numpy(b[..., 4:16].astype(np.int32))  # 12 bytes of 6-bit scales and mins
        sc = torch.empty(n, k // 256, 8, dtype=torch.int32)
        mn = torch.empty_like(sc)
        sc[..., :4] = s[..., 0:4] & 63
        mn[..., :4] = s[..., 4:8] & 63
        sc[..., 4:] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
        mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
        qs = torch.from_numpy(b[..., 16:].astype(np.int32)).reshape(n, k // 256, 4, 32)
        # Each 32 bytes hold two sub-blocks: low nibbles first, then high nibbles.
        vals = torch.stack([qs & 15, qs >> 4], dim=3).reshape(n, k)
        scale = (d[..., None] * sc.float()).reshape(n, k // GROUP)
        minus = (dmin[..., None] * mn.float()).reshape(n, k // GROUP)
        return vals, scale, scale * 8 - minus
    b = blocks.reshape(n, k // 32, -1)
    d = _f16(b[..., 0:2])[..., 0]
    if q.qtype == Q.Q4_0:
        qs = torch.from_numpy(b[..., 2:18].astype(np.int32))
        vals = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, k)
        return vals, d, torch.zeros_like(d)
    if q.qtype == Q.Q4_1:
        m = _f16(b[..., 2:4])[..., 0]
        qs = torch.from_numpy(b[..., 4:20].astype(np.int32))
        vals = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, k)
        return vals, d, d * 8 + m
    raise ValueError(f"{q.name}: {q.qtype.name} is not a 4-bit type")


@dataclass
class PackedMatrix:
    """One weight matrix [N, K] in a fast layout; `matmul(x)` computes x @ W^T."""

    layout: str  # "gguf" | "int4" | "int8" | "bf16" | "f32"
    n: int
    k: int
    # gguf: uint8 blocks [N, row bytes] (numpy, often a view of the mmap); int4: packed uint8;
    # int8: int8 [N, K]; bf16, f32: [N, K]
    weight: torch.Tensor | np.ndarray
    scales: torch.Tensor | None = None  # int4: bf16 [K/32, N, 2]; int8: fp32 [N]
    source_type: str = ""
    # Opt-in: many-row int8 matmuls quantize activations to int8 per row and use torch._int_mm.
    # Faster prefill, but on Gemma 270M top-1 agreement with llama.cpp drops from 96.5% to 92.9%
    # (bench/gemma_agreement.py): activation outliers make a row's int8 step coarse.
    int8_activations: bool = False
    # gguf: the address of the first block, the C kernel's fixed arguments (checked once: a decode
    # step makes over a hundred calls) and the most rows of activations it takes
    ptr: int = field(default=0, init=False)
    prepared: tuple = field(default=(), init=False, repr=False)
    kernel_rows: int = field(default=0, init=False)
    amx_rows: int = field(default=0, init=False)  # up to this many rows: the int8 tile kernel (0: none)
    bf16_tiles: bool = field(default=False, init=False)  # above amx_rows: the bf16 tile kernel
    amx_band: int = field(default=0, init=False)  # the int8 tile kernel's own bound, should bf16 go off

    def __post_init__(self) -> None:
        if self.layout == "gguf":
            qtype = Q[self.source_type]
            self.prepared = qblocks.prepare(qtype, self.weight, self.k)
            self.ptr = self.prepared[1]
            self.kernel_rows = qblock_rows(qtype)
            if qtype in QBLOCK_AMX_ROWS and qblocks.amx(qtype):
                self.kernel_rows, self.amx_rows = QBLOCK_AMX_ROWS[qtype]
                self.amx_band = self.amx_rows
                if qblocks.amx_bf16() and self.k % 32 == 0:
                    self.bf16_tiles = True
                    self.amx_rows = max(self.kernel_rows, QBLOCK_AMX_INT8_ROWS.get(qtype, 0))

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (any float dtype) -> [M, N] in fp32."""
        if self.layout == "f32":
            return F.linear(x.float(), self.weight)
        if self.layout == "gguf":
            if x.shape[0] <= self.kernel_rows:
                return qblocks.matmul_prepared(self.prepared, x)
            if x.shape[0] <= self.amx_rows:
                return qblocks.matmul_amx_prepared(self.prepared, x)
            if self.bf16_tiles:
                if qblocks.amx_bf16():
                    return qblocks.matmul_amx_bf16_prepared(self.prepared, x)
                if x.shape[0] <= self.amx_band:  # set_vnni(False) since: the int8 tiles' own band
                    return qblocks.matmul_amx_prepared(self.prepared, x)
            qtype = Q[self.source_type]
            return _sliced_gemm(
                x,
                self.n,
                self.k,
                lambda a, b, dt, out: qblocks.dequantize(qtype, self.weight, self.k, a, b, dt, out),
            )
        if self.layout == "int8" and x.shape[0] > PREFILL_ROWS:
            gemm = _int8_gemm if self.int8_activations else _dequantized_gemm
            return gemm(x, self.weight, self.scales)
        xb = x.to(torch.bfloat16)
        if self.layout == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.weight, GROUP, self.scales)
        elif self.layout == "int8":
            y = torch.ops.aten._weight_int8pack_mm(xb, self.weight, self.scales.to(torch.bfloat16))
        else:
            y = F.linear(xb, self.weight)
        return y.float()

    def dequantized(self) -> torch.Tensor:
        """The weights this layout computes with, in fp32 (for tests and error bounds)."""
        if self.layout == "gguf":
            return qblocks.dequantize(Q[self.source_type], self.weight, self.k)
        if self.layout == "int8":
            return self.weight.float() * self.scales[:, None]
        if self.layout in ("bf16", "f32"):
            return self.weight.float()
        eye = torch.eye(self.k, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, GROUP, self.scales).float().t()


@functools.cache
def gemm_dtype() -> torch.dtype:
    """bf16 where the CPU multiplies it natively (AVX-512 BF16 or AMX), else fp32: elsewhere a bf16
    GEMM is emulated (bench/int8_prefill.py times both), and it rounds the activations."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


def qblock_rows(qtype: Q) -> int:
    """The most rows of activations a `gguf` matrix of this type multiplies with the C kernel."""
    if gemm_dtype() == torch.bfloat16:
        return QBLOCK_ROWS_NATIVE_BF16.get(qtype, 16)
    return 1 << 62 if qtype in K_QUANTS else QBLOCK_ROWS


def _sliced_gemm(x: torch.Tensor, n: int, k: int, rows, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T with W's rows produced GEMM_SLICE_BYTES at a time by `rows(start, stop, dtype, out)`
    into `out` (a [stop - start, K] tensor of `gemm_dtype()`: the fp32 values rounded, where that is
    bf16), each slice multiplied in that dtype; `scale` [N] multiplies each output column. The slice
    lives in a per-thread buffer reused from call to call (`scratch`)."""
    dtype = gemm_dtype()
    xd = x.to(dtype)
    step = max(1, GEMM_SLICE_BYTES // (k * 4))
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        w = rows(start, stop, dtype, scratch("gemm_w", (stop - start, k), dtype))
        y = F.linear(xd, w)
        if scale is not None:
            torch.mul(y.float(), scale[start:stop], out=out[:, start:stop])
        else:
            out[:, start:stop] = y
    return out


_buffers = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor for a temporary that dies before the next request for
    `name` on this thread: a view of a grow-only buffer kept per thread and name. Prefill's
    temporaries are tens of MB (a layer's (token, expert) rows, a dequantized weight slice), and a
    fresh tensor that size is fresh pages from the OS each time (glibc maps allocations that large
    and unmaps them when freed): 8 ms of page faults per 25 MB on one thread here, against 1.5 for
    the copy into it. Under autograd a new tensor, as the graph may keep it."""
    numel = math.prod(shape)
    if torch.is_grad_enabled():
        return torch.empty(shape, dtype=dtype)
    buf = getattr(_buffers, name, None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = torch.empty(numel, dtype=dtype)
        setattr(_buffers, name, buf)
    return buf[:numel].view(shape)


def _dequantized_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x @ (w * w_scale)^T for int8 w [N, K], dequantized a slice at a time: the same products as
    `_weight_int8pack_mm` (exact int8 weights, the scale applied per output)."""
    return _sliced_gemm(x, w.shape[0], w.shape[1], lambda a, b, dt, out: out.copy_(w[a:b]), w_scale)


def _int8_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x @ (w * w_scale)^T with x quantized to int8 per row; int32 accumulation via torch._int_mm."""
    xf = x.float()
    x_scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    xq = torch.round(xf / x_scale).to(torch.int8)
    acc = torch._int_mm(xq, w.t())
    return acc.float() * x_scale * w_scale[None, :]


def _int4_fits(qtype: Q, n: int, k: int) -> bool:
    return qtype in INT4_TYPES and k % GROUP == 0 and n % 16 == 0  # torch's packer needs N % 16


def auto_layout(qtype: Q, n: int, k: int) -> str:
    """The layout `pack(..., "auto")` keeps an [N, K] matrix of `qtype` in: `gguf` (the blocks as
    they are) where the C kernels are built and have the type, else the torch layout for the type."""
    if qblocks.supports(qtype, k):
        return "gguf"
    if _int4_fits(qtype, n, k):
        return "int4"
    if qtype == Q.F32:
        return "f32"
    return "bf16" if qtype in HALF_TYPES else "int8"


def pack(q: QuantizedTensor, layout: str = "auto", *, int8_activations: bool = False) -> PackedMatrix:
    """Repack one GGUF matrix [N, K]. `layout`: auto, gguf, int4, int8, bf16 or f32.

    auto: `gguf` (the blocks as they are) where the C kernels are built and have the type, else
    the torch layout for the type."""
    if len(q.shape) != 2:
        raise ValueError(f"{q.name}: expected a matrix, got shape {q.shape}")
    n, k = q.shape
    if layout == "auto":
        layout = auto_layout(q.qtype, n, k)
    if layout == "gguf":
        if not qblocks.supports(q.qtype, k):
            why = (
                "graftlm._qkernels is not built"
                if not qblocks.available()
                else f"{q.qtype.name} {q.shape} has no kernel"
            )
            raise ValueError(f"{q.name}: the gguf layout needs the C kernels for its type: {why}")
        rows = qblocks.as_rows(q.data, q.qtype, n, k)
        return PackedMatrix("gguf", n, k, rows, None, q.qtype.name)
    if layout == "int4":
        if not _int4_fits(q.qtype, n, k):
            raise ValueError(
                f"{q.name}: the int4 layout needs a Q4_0, Q4_1 or Q4_K matrix with rows a multiple of 16 "
                f"and columns of 32; this one is {q.qtype.name} {q.shape}"
            )
        vals, scale, zero = q4_groups(q)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals.contiguous(), 1)
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return PackedMatrix("int4", n, k, packed, sz, q.qtype.name)
    w = dequantize(q.data, q.qtype, q.shape, torch.float32, name=q.name)
    if layout == "f32":
        return PackedMatrix("f32", n, k, w.contiguous(), None, q.qtype.name)
    if layout == "bf16":
        return PackedMatrix("bf16", n, k, w.to(torch.bfloat16), None, q.qtype.name)
    if layout == "int8":
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        w8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return PackedMatrix("int8", n, k, w8.contiguous(), scale, q.qtype.name, int8_activations)
    raise ValueError(f"unknown layout {layout!r}; expected auto, gguf, int4, int8, bf16 or f32")
