"""graftlm's C kernels on GGUF blocks (graftlm/kernels/cpu/qkernels.c): decode GB/s and prefill GOPS.

    python bench/qblocks.py [--threads 1 2] [--isa avx2|portable]

(`avx2` keeps the AVX-512 one-row kernels where the CPU has them; part 1 times them both ways.)

Part 1 (decode): the memory bandwidth (torch.sum over 1 GiB), then one activation row against
matrices of each type, 2048 wide, small enough for the L3 cache (4096 rows) and far larger (65536
rows, read from DRAM): microseconds and GB/s of blocks read. To see what the kernels' software
prefetch gives, rebuild without it: `CFLAGS=-DPREFETCH=0 pip install -e .`.
Then the dequantizer's rate per type, to fp32 and to bf16. Part 2 (prefill): expert-sized matrices at 4-512 activation rows, the C kernel against the path it
replaces above `qblock_rows()` (the blocks dequantized a slice at a time, then an fp32/bf16 GEMM), and
where the CPU has AMX the tile kernel, in GOPS (2 x rows x N x K per second). Blocks come from the tests' generator (tests/weights/blocks.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from timing import best_ms  # (bench/ is not a package: run as python bench/qblocks.py)

from graftlm.kernels.cpu import packed, qblocks

sys.path.insert(0, str(Path(__file__).parents[1]))
from tests.weights.blocks import random_blocks  # noqa: E402  (the tests' valid random blocks)

Q = gguf.GGMLQuantizationType
# Expert-sized matrices (a gate/up pair's 2816 x 2048, a down projection's 2048 x 1408), each type the
# tile kernels take (bench/amx_bf16.py times them too)
EXPERT_SHAPES = (
    (Q.Q4_K, 2816, 2048),
    (Q.Q5_K, 2048, 1536),
    (Q.Q6_K, 2048, 1280),
    (Q.Q4_0, 2816, 2048),
    (Q.Q4_1, 2048, 1408),
    (Q.Q5_0, 2048, 1408),
    (Q.Q5_1, 2048, 1408),
    (Q.Q8_0, 2048, 1408),
)


def kernel_s(qtype: Q, rows: np.ndarray, x: torch.Tensor) -> float:
    out = torch.empty(x.shape[0], rows.shape[0])
    return best_ms(lambda: qblocks.matmul(qtype, rows, x, out)) / 1e3


def gemm_s(qtype: Q, rows: np.ndarray, x: torch.Tensor) -> float:
    n, k = rows.shape[0], x.shape[1]
    return (
        best_ms(
            lambda: packed._sliced_gemm(
                x, n, k, lambda a, b, dt, out: qblocks.dequantize(qtype, rows, k, a, b, dt, out)
            )
        )
        / 1e3
    )


def amx_s(qtype: Q, rows: np.ndarray, x: torch.Tensor) -> float:
    prepared = qblocks.prepare(qtype, rows, x.shape[1])
    return best_ms(lambda: qblocks.matmul_amx_prepared(prepared, x)) / 1e3


def bandwidth() -> None:
    """What one pass over memory can read: torch.sum over 1 GiB of fp32 (the decode bound)."""
    x = torch.ones(1 << 28)
    print(f"torch.sum over 1 GiB: {x.nbytes / best_ms(x.sum, 5) / 1e6:.1f} GB/s\n")


def decode(rng: np.random.Generator) -> None:
    """One activation row; where the AVX2 path has its AVX-512 kernels (VNNI: Q4_0, Q5_0, Q8_0; 512-bit
    vectors: Q5_K, Q6_K), the last column times the same matrix with them off
    (`_qkernels.set_vnni(False)`): the same results."""
    vnni = qblocks.vnni()
    print("| type | rows x 2048 | MB | us | GB/s |" + (" us without AVX-512 |" if vnni else ""))
    print("|---|---|---|---|---|" + ("---|" if vnni else ""))
    for qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        for n in (4096, 65536):
            rows = qblocks.as_rows(random_blocks(qtype, n, 2048, rng, scales=(1e-3, 1e-2)), qtype, n, 2048)
            x = torch.randn(1, 2048)
            s = kernel_s(qtype, rows, x)
            line = f"| {qtype.name} | {n} | {rows.nbytes / 1e6:.1f} | {s * 1e6:.0f} | {rows.nbytes / s / 1e9:.1f} |"
            if vnni:
                plain = None
                if qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q5_K, Q.Q6_K):
                    qblocks._qkernels.set_vnni(False)
                    plain = kernel_s(qtype, rows, x)
                    qblocks._qkernels.set_vnni(True)
                line += f" {plain * 1e6:.0f} |" if plain else " - |"
            print(line)


def dequantization(rng: np.random.Generator) -> None:
    """What the many-row path pays before its GEMM: one 2048 x 1536 matrix of each type dequantized
    to fp32 and, in one pass, to bf16 (the GEMM's dtype where the CPU has native bf16). Where that
    pass takes AVX-512 BF16 (`qblocks.bf16()`), the last column times it with the AVX2 code instead
    (`_qkernels.set_vnni(False)`): the same bits."""
    bf16 = qblocks.bf16()
    print(
        "\n| type | fp32 G weights/s | bf16 G weights/s |"
        + (" bf16 without AVX-512 BF16 |" if bf16 else "")
        + "\n|---|---|---|"
        + ("---|" if bf16 else "")
    )
    n, k = 2048, 1536
    for qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        rows = qblocks.as_rows(random_blocks(qtype, n, k, rng, scales=(1e-3, 1e-2)), qtype, n, k)

        def rate(dt: torch.dtype, q=qtype, r=rows) -> float:
            return n * k / best_ms(lambda: qblocks.dequantize(q, r, k, dtype=dt)) / 1e6

        line = f"| {qtype.name} | {rate(torch.float32):.2f} | {rate(torch.bfloat16):.2f} |"
        if bf16:
            qblocks._qkernels.set_vnni(False)
            line += f" {rate(torch.bfloat16):.2f} |"
            qblocks._qkernels.set_vnni(True)
        print(line)


def prefill(rng: np.random.Generator) -> None:
    amx = qblocks.amx()
    print(
        "\n| type | N x K | rows | C kernel ms (GOPS) | dequantize + GEMM ms (GOPS) | GEMM / kernel |"
        + (" AMX tile kernel ms (GOPS) |" if amx else "")
    )
    print("|---|---|---|---|---|---|" + ("---|" if amx else ""))
    # the row counts bracket packed.py's QBLOCK_AMX_ROWS bounds
    for qtype, n, k in EXPERT_SHAPES:
        rows = qblocks.as_rows(random_blocks(qtype, n, k, rng, scales=(1e-3, 1e-2)), qtype, n, k)
        for m in (2, 4, 8, 16, 48, 128, 192, 256, 512):
            x = torch.randn(m, k)
            a, b = kernel_s(qtype, rows, x), gemm_s(qtype, rows, x)
            ops = 2 * m * n * k / 1e9
            line = (
                f"| {qtype.name} | {n} x {k} | {m} | {a * 1e3:.2f} ({ops / a:.0f}) | {b * 1e3:.2f} ({ops / b:.0f}) "
                f"| {b / a:.2f} |"
            )
            if amx:
                c = amx_s(qtype, rows, x) if qblocks.amx(qtype) else None
                line += f" {c * 1e3:.2f} ({ops / c:.0f}) |" if c else " - |"
            print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--isa", default="avx2", choices=["avx2", "portable"])
    args = ap.parse_args()
    if not qblocks.available():
        raise SystemExit("graftlm._qkernels is not built (pip install -e . with a C compiler)")
    isa = qblocks.set_isa(args.isa)
    print(
        f"kernels: {isa}{' and the AMX tile kernel' if qblocks.amx() else ''}; GEMM dtype {packed.gemm_dtype()}"
    )
    rng = np.random.default_rng(0)
    for t in args.threads:
        torch.set_num_threads(t)
        print(f"\n## {t} thread(s)\n")
        bandwidth()
        decode(rng)
        dequantization(rng)
        prefill(rng)


if __name__ == "__main__":
    main()
