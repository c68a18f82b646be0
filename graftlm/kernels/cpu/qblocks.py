"""Matrix products computed directly on GGUF blocks by the C extension `graftlm._qkernels`.

The extension (graftlm/kernels/cpu/qkernels.c, built by setup.py) quantizes activations to int8 with
an fp32 scale per block (32 values for the 32-value types, 256 for K-quants, as ggml's Q8_0 and Q8_K)
and takes each block's dot product in integers, as llama.cpp does;
weights stay in their GGUF blocks, memory-mapped, with no repacked copy. Its AVX2 path is chosen at
run time where the CPU has AVX2, FMA and F16C, portable C elsewhere; on it, Q4_0, Q5_0 and Q8_0's
one-row kernels take AVX-512 VNNI instructions where the CPU has them, and Q5_K and Q6_K's 512-bit
vectors (`vnni()`; the same results bit for bit; `python bench/qblocks.py` times both), and
dequantization to bf16 takes AVX-512 BF16 (`bf16()`; the same values). Where the CPU has AMX (and
Linux grants the tile state), `matmul_amx_prepared` computes the same products for many rows on the
tile unit, with activations rounded per block of 32 for every type (`amx()` says whether it runs), and
where it also has AMX-BF16, `matmul_amx_bf16_prepared` multiplies in bf16 on the tile unit, the weights
dequantized into the core's cache up to 512 KB of rows at a time (`amx_bf16()`).

Where the extension is missing (no compiler at install) or `GRAFTLM_CPU_KERNELS=torch`, `available()`
is False and graftlm repacks weights for torch's kernels instead (graftlm/kernels/cpu/packed.py).
`GRAFTLM_CPU_KERNELS=portable` keeps the extension but forces its portable path.

Error bound of `matmul` against dequantize-then-fp32 (tested in tests/kernels/test_qblocks.py):
each activation block x_b is rounded to d_b * round(x_b / d_b) with d_b = max|x_b| / 127, so
|y - y_exact| <= sum_b (d_b / 2) * sum_{j in b} |w_j|, plus fp32 rounding of the sums.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import torch  # noqa: F401  (loaded first, so the extension shares torch's OpenMP runtime)

Q = gguf.GGMLQuantizationType
TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})

try:
    from graftlm import _qkernels
except ImportError:  # built without a compiler: torch's kernels take over
    _qkernels = None

_MODE = os.environ.get("GRAFTLM_CPU_KERNELS", "auto").lower()
if _MODE not in ("auto", "torch", "portable"):
    raise ValueError(f"GRAFTLM_CPU_KERNELS={_MODE!r}: expected auto, torch or portable")
if _qkernels is not None and _MODE == "portable":
    _qkernels.set_isa("portable")


def available() -> bool:
    """Whether products on GGUF blocks can run here."""
    return _qkernels is not None and _MODE != "torch"


def isa() -> str:
    """The extension's code path: avx2, portable, or none (torch's kernels are used)."""
    return _qkernels.isa() if available() else "none"


def amx(qtype: Q | None = None) -> bool:
    """Whether the tile (AMX) kernel runs here: an AMX CPU, Linux's permission, the AVX2 path in use
    (not `GRAFTLM_CPU_KERNELS=portable`), and for `qtype` one of the types it takes."""
    if not available() or _qkernels.isa() != "avx2" or not hasattr(_qkernels, "amx"):
        return False
    return bool(_qkernels.amx(-1 if qtype is None else int(qtype)))


def amx_bf16() -> bool:
    """Whether the bf16 tile kernel (`matmul_amx_bf16_prepared`) runs here: AMX-BF16 and AVX-512 BF16
    besides what `amx()` needs, with the AVX-512 kernels on (`vnni()`)."""
    return available() and _qkernels.isa() == "avx2" and bool(getattr(_qkernels, "amx_bf16", bool)())


def vnni() -> bool:
    """Whether the AVX2 path runs its AVX-512 one-row kernels (VNNI for Q4_0, Q5_0, Q8_0; 512-bit
    vectors for Q5_K, Q6_K; the AVX2 kernels' results bit for bit). `_qkernels.set_vnni(False)` turns
    them off."""
    return available() and bool(_qkernels.vnni())


def bf16() -> bool:
    """Whether dequantization to bf16 (the many-row GEMM path's) runs on AVX-512 BF16: with `vnni()`,
    where the CPU has it; the AVX2 path's values bit for bit, about twice as fast."""
    return available() and bool(_qkernels.bf16())


def set_isa(name: str) -> str:
    """Choose the extension's code path (avx2 where the CPU has it, or portable); returns it."""
    if _qkernels is None:
        raise RuntimeError("graftlm._qkernels is not built (see setup.py)")
    return _qkernels.set_isa(name)


def supports(qtype: Q, k: int) -> bool:
    block = gguf.GGML_QUANT_SIZES[qtype][0] if qtype in TYPES else 0
    return available() and block > 0 and k % block == 0


def row_bytes(qtype: Q, k: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return k // block * size


def as_rows(data: np.ndarray, qtype: Q, n: int, k: int) -> np.ndarray:
    """GGUF block bytes as a C-contiguous uint8 [n, row_bytes] array (a view where possible)."""
    return np.ascontiguousarray(data).view(np.uint8).reshape(n, row_bytes(qtype, k))


def _check_rows(qtype: Q, rows: np.ndarray, k: int) -> None:
    if (
        rows.dtype != np.uint8
        or rows.ndim != 2
        or not rows.flags.c_contiguous
        or rows.shape[1] != row_bytes(qtype, k)
    ):
        raise ValueError(
            f"blocks must be C-contiguous uint8 [N, {row_bytes(qtype, k)}] for {qtype.name} rows of {k}, "
            f"not {rows.dtype} {rows.shape}"
        )


def address(rows: np.ndarray) -> int:
    """The address of `rows`' first byte (keep `rows` alive while it is used)."""
    return rows.__array_interface__["data"][0]


def matmul(
    qtype: Q, rows: np.ndarray, x: torch.Tensor, out: torch.Tensor | None = None, ptr: int | None = None
) -> torch.Tensor:
    """x [M, K] @ W^T for W [N, K] in GGUF blocks `rows` (from `as_rows`; `ptr` its `address`, when the
    caller has it) -> fp32 [M, N]. `out` may be a column slice of a wider matrix."""
    if x.dim() != 2 or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU matrix [M, K], not {tuple(x.shape)} on {x.device}")
    n, k = rows.shape[0], x.shape[1]
    _check_rows(qtype, rows, k)
    xf = x.to(torch.float32).contiguous()
    m = xf.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    elif out.shape != (m, n) or out.stride(1) != 1 or out.dtype != torch.float32 or out.device.type != "cpu":
        raise ValueError(
            f"out must be fp32 [{m}, {n}] on the CPU, rows contiguous; not {out.dtype} {tuple(out.shape)}"
        )
    ptr = address(rows) if ptr is None else ptr
    threads = torch.get_num_threads()
    _qkernels.matmul(
        int(qtype), ptr, rows.shape[1], n, k, xf.data_ptr(), m, out.data_ptr(), out.stride(0), threads
    )
    return out


def prepare(qtype: Q, rows: np.ndarray, k: int) -> tuple[int, int, int, int, int]:
    """The checked, fixed arguments of `matmul_prepared` for one matrix [N, K] (keep `rows` alive)."""
    _check_rows(qtype, rows, k)
    return int(qtype), address(rows), rows.shape[1], rows.shape[0], k


def matmul_prepared(prepared: tuple[int, int, int, int, int], x: torch.Tensor) -> torch.Tensor:
    """`matmul` on a matrix checked once by `prepare`: x [M, K] -> fp32 [M, N]. A decode step makes
    over a hundred of these calls, so this path does only the checks that depend on x."""
    return _run_prepared(_qkernels.matmul, prepared, x)


def matmul_amx_prepared(prepared: tuple[int, int, int, int, int], x: torch.Tensor) -> torch.Tensor:
    """`matmul_prepared` on the tile unit (where `amx(qtype)`): the same activation rounding per block
    of 32 (finer than the 256 of `matmul` for Q4_K/Q5_K), so the same error bound; faster from a few
    rows to a hundred or so (bench/qblocks.py)."""
    return _run_prepared(_qkernels.matmul_amx, prepared, x)


def matmul_amx_bf16_prepared(prepared: tuple[int, int, int, int, int], x: torch.Tensor) -> torch.Tensor:
    """x @ W^T on the tile unit in bf16 (where `amx_bf16()`): W dequantized to bf16 into cache, a unit
    of rows at a time (the values `dequantize(..., torch.bfloat16)` gives), x rounded to bf16 as `.to(torch.bfloat16)`
    rounds it, every sum in fp32 -- the products of the dequantize + bf16 GEMM path, in one pass with
    no dequantized copy in memory (bf16 subnormals, |x| < 2^-126, count as zero on the tile unit);
    ahead of the int8 tile kernel from 8-12 rows up (bench/amx_bf16.py)."""
    return _run_prepared(_qkernels.matmul_amx_bf16, prepared, x)


def matmul_amx_bf16_many(
    prepared: list[tuple[int, int, int, int, int]], x: torch.Tensor
) -> list[torch.Tensor]:
    """`matmul_amx_bf16_prepared` for several matrices of width K sharing x [M, K] (an expert's gate
    and up), in one grouped call: x rounded once, the matrices' rows shared out between the threads.
    Each output is the one the single call gives, bit for bit (every sum runs in one order)."""
    x = _shared_x(prepared, x)
    outs = [torch.empty(x.shape[0], p[3], dtype=torch.float32) for p in prepared]
    matmul_amx_bf16_grouped([(p, x, out) for p, out in zip(prepared, outs)])
    return outs


def matmul_amx_bf16_grouped(
    products: list[tuple[tuple[int, int, int, int, int], torch.Tensor, torch.Tensor]],
) -> None:
    """out = x @ W^T, as `matmul_amx_bf16_prepared` computes it, for each (prepared W [N, K], x [M, K],
    out [M, N]) of `products` (all of one width K), in one C call: a prefill's routed experts, every
    expert with its rows. x is fp32 and contiguous; out is an fp32 view with contiguous rows (a slice of
    a bigger buffer's rows or columns). Consecutive products with the same x round it once. Each output
    is the single call's, bit for bit; the threads take units of rows as they come free. The outputs
    must not overlap (the threads write them at once)."""
    if not products:
        return
    k = products[0][0][4]
    specs = []
    for prepared, x, out in products:
        m, n = (x.shape[0] if x.dim() == 2 else -1), prepared[3]
        if (
            prepared[4] != k
            or x.dim() != 2
            or x.shape[1] != k
            or x.dtype != torch.float32
            or not x.is_contiguous()
            or out.shape != (m, n)
            or out.dtype != torch.float32
            or out.stride(1) != 1
            or (m > 1 and out.stride(0) < n)
            or x.device.type != "cpu"
            or out.device.type != "cpu"
        ):
            raise ValueError(
                f"each product needs a contiguous fp32 CPU x [M, {k}] and an fp32 out [M, {n}] with contiguous "
                f"rows, not x {x.dtype} {tuple(x.shape)} and out {out.dtype} {tuple(out.shape)}"
            )
        specs.append((*prepared[:4], x.data_ptr(), m, out.data_ptr(), max(out.stride(0), n)))
    _qkernels.matmul_amx_bf16_grouped(k, torch.get_num_threads(), specs)


def _run_prepared(kernel, prepared: tuple[int, int, int, int, int], x: torch.Tensor) -> torch.Tensor:
    n, k = prepared[3], prepared[4]
    if x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU matrix [M, {k}], not {tuple(x.shape)} on {x.device}")
    x = x.to(torch.float32).contiguous()
    m = x.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    kernel(*prepared, x.data_ptr(), m, out.data_ptr(), n, torch.get_num_threads())
    return out


def matmul_many(prepared: list[tuple[int, int, int, int, int]], x: torch.Tensor) -> list[torch.Tensor]:
    """x [M, K] through several matrices checked by `prepare` (all of width K), in one C call: one
    quantization of x per block size and one parallel region -> fp32 [M, N] for each matrix."""
    return _run_many(_qkernels.matmul_many, prepared, x)


def _shared_x(prepared: list[tuple[int, int, int, int, int]], x: torch.Tensor) -> torch.Tensor:
    """x [M, K] checked against the matrices' width K, as contiguous fp32."""
    k = x.shape[-1]
    if x.dim() != 2 or x.device.type != "cpu" or any(p[4] != k for p in prepared):
        raise ValueError(
            f"x must be a CPU matrix [M, K] with K the matrices' width {sorted({p[4] for p in prepared})}, "
            f"not {tuple(x.shape)} on {x.device}"
        )
    return x.to(torch.float32).contiguous()


def _run_many(kernel, prepared: list[tuple[int, int, int, int, int]], x: torch.Tensor) -> list[torch.Tensor]:
    x = _shared_x(prepared, x)
    m = x.shape[0]
    outs = [torch.empty(m, p[3], dtype=torch.float32) for p in prepared]
    specs = [(p[0], p[1], p[2], p[3], out.data_ptr(), p[3]) for p, out in zip(prepared, outs)]
    kernel(x.shape[1], x.data_ptr(), m, torch.get_num_threads(), specs)
    return outs


def matmul_experts(qtype: Q, ptrs: torch.Tensor, row_bytes: int, n: int, x: torch.Tensor) -> torch.Tensor:
    """One row through each of E matrices [N, K] of type `qtype` at addresses `ptrs` (int64 [E], or
    [S, E] for S sets of E matrices that take the same rows: an expert's gate and up) -> fp32 [E, N]
    (or [S, E, N]). x is [1, K] (the same row for all) or [E, K] (a row each). The caller keeps the
    matrices alive."""
    if x.dim() != 2 or x.device.type != "cpu" or ptrs.dtype != torch.int64 or ptrs.dim() not in (1, 2):
        raise ValueError(
            f"x must be a CPU matrix and ptrs int64 [E] or [S, E], not {tuple(x.shape)} on {x.device}, "
            f"{ptrs.dtype} {tuple(ptrs.shape)}"
        )
    sets, count = (1, ptrs.shape[0]) if ptrs.dim() == 1 else ptrs.shape
    k = x.shape[-1]
    xf = x.to(torch.float32).contiguous()
    if xf.shape[0] not in (1, count):
        raise ValueError(f"x has {xf.shape[0]} rows for {count} matrices")
    out = torch.empty(*ptrs.shape, n, dtype=torch.float32)
    if count == 0 or sets == 0:
        return out
    ptrs = ptrs.contiguous()
    _qkernels.matmul_experts(
        int(qtype),
        ptrs.data_ptr(),
        count,
        row_bytes,
        n,
        k,
        xf.data_ptr(),
        xf.shape[0],
        out.data_ptr(),
        torch.get_num_threads(),
        sets,
    )
    return out


def dequantize(
    qtype: Q,
    rows: np.ndarray,
    k: int,
    start: int = 0,
    stop: int | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows start..stop of W as [rows, K], computed as gguf-py computes them, in fp32 or (dtype
    bfloat16) those values rounded as `.to(torch.bfloat16)` rounds them, in one pass; into `out`
    (a contiguous CPU tensor of that shape and dtype) when given."""
    stop = rows.shape[0] if stop is None else stop
    _check_rows(qtype, rows, k)
    if not 0 <= start <= stop <= rows.shape[0]:
        raise ValueError(f"rows {start}:{stop} out of 0:{rows.shape[0]}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dequantize writes float32 or bfloat16, not {dtype}")
    if out is None:
        out = torch.empty(stop - start, k, dtype=dtype)
    elif (
        out.shape != (stop - start, k)
        or out.dtype != dtype
        or out.device.type != "cpu"
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous CPU {dtype} tensor [{stop - start}, {k}], not {out.dtype} {tuple(out.shape)}"
        )
    part = rows[start:stop]
    _qkernels.dequantize(
        int(qtype),
        address(part),
        rows.shape[1],
        stop - start,
        k,
        out.data_ptr(),
        torch.get_num_threads(),
        dtype == torch.bfloat16,
    )
    return out
