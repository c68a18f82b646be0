"""The bf16 tile kernel against the paths it competes with, to place packed.py's row bounds.

    python bench/amx_bf16.py [--threads 1 2] [--rounds 7] [--rows 8 16 32 48 64 128 256 512]

For expert-sized matrices of each type the C kernels take (blocks from the tests' generator), times
at each activation row count, in interleaved rounds (this machine's speed drifts within minutes):
the one-row C kernel (`matmul`, up to 64 rows), the int8 tile kernel (`matmul_amx`, up to 256 rows),
the bf16 tile kernel (`matmul_amx_bf16`) and the dequantize + bf16 GEMM path it replaces
(`packed._sliced_gemm`). Prints the median milliseconds of each and, per type, the fewest rows from
which the bf16 tile kernel leads the int8 one (the bound packed.QBLOCK_AMX_ROWS should hold).
Needs a CPU with AMX-BF16 (Intel Sapphire Rapids or later).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from graftlm.kernels.cpu import packed, qblocks

sys.path.insert(0, str(Path(__file__).parents[1]))
from qblocks import EXPERT_SHAPES  # noqa: E402  (bench/qblocks.py: bench/ is not a package)

from tests.weights.blocks import random_blocks  # noqa: E402  (the tests' valid random blocks)

Q = gguf.GGMLQuantizationType


def paths(qtype: Q, rows: np.ndarray, x: torch.Tensor) -> dict:
    """The products to time for x [m, K] against the matrix `rows`, by name."""
    m, k, n = x.shape[0], x.shape[1], rows.shape[0]
    prepared = qblocks.prepare(qtype, rows, k)
    out = {
        "bf16": lambda: qblocks.matmul_amx_bf16_prepared(prepared, x),
        "gemm": lambda: packed._sliced_gemm(
            x, n, k, lambda a, b, dt, o: qblocks.dequantize(qtype, rows, k, a, b, dt, o)
        ),
    }
    if m <= 64:
        out["kernel"] = lambda: qblocks.matmul_prepared(prepared, x)
    if m <= 256 and qblocks.amx(qtype):
        out["int8"] = lambda: qblocks.matmul_amx_prepared(prepared, x)
    return out


def interleaved_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Each function once per round, in turn; the median milliseconds of each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, nargs="*", default=[8, 16, 32, 48, 64, 128, 256, 512])
    args = ap.parse_args()
    if not qblocks.amx_bf16():
        raise SystemExit("the bf16 tile kernel does not run here (needs AMX-BF16 and graftlm._qkernels)")
    rng = np.random.default_rng(0)
    mats = [
        (qtype, qblocks.as_rows(random_blocks(qtype, n, k, rng, scales=(1e-3, 1e-2)), qtype, n, k))
        for qtype, n, k in EXPERT_SHAPES
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n## {threads} thread(s), median ms of {args.rounds} interleaved rounds\n")
        print(
            "| type | N x K | rows | C kernel | int8 tiles | bf16 tiles | dequantize + GEMM | bf16 tiles GFLOP/s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for qtype, rows in mats:
            n, k = (
                rows.shape[0],
                rows.shape[1] * gguf.GGML_QUANT_SIZES[qtype][0] // gguf.GGML_QUANT_SIZES[qtype][1],
            )
            lead = None
            for m in args.rows:
                ms = interleaved_ms(paths(qtype, rows, torch.randn(m, k)), args.rounds)
                if lead is None and "int8" in ms and ms["bf16"] < ms["int8"]:
                    lead = m
                cells = " | ".join(
                    f"{ms[name]:.2f}" if name in ms else "-" for name in ("kernel", "int8", "bf16", "gemm")
                )
                print(
                    f"| {qtype.name} | {n} x {k} | {m} | {cells} | {2 * m * n * k / ms['bf16'] / 1e6:.0f} |"
                )
            print(f"| {qtype.name} | | bf16 tiles lead int8 tiles from | {lead} rows | | | | |")


if __name__ == "__main__":
    main()
