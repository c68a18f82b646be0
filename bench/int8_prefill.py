"""Prefill on int8-layout weights (Q5_0/Q6_K/Q8_0): torch's weight-only kernel against a GEMM on
the weights dequantized (graftlm/kernels/cpu/packed.py `_dequantized_gemm`), per row count.

The int8 layout is now the fallback (no C kernels, or `layout: int8`); with the C kernels built,
`rules="auto"` keeps GGUF blocks and bench/qblocks.py measures that path.

    python bench/int8_prefill.py [--threads 1] [--models PATH ...] [--repeat 2]

Part 1 times one expert-sized matrix (1408 x 2048, and its transpose) at 4-512 rows:
`_weight_int8pack_mm` on bf16 activations (what runs at or below PREFILL_ROWS), the fp32 GEMM and
the bf16 GEMM (what `gemm_dtype()` picks on CPUs without / with native bf16), with GFLOP/s.
Part 2 (with --models) loads each model with rules="auto" and times a 512-token prefill with the
many-row path, then with the weight-only kernel put back, alternating, in one process, after one
untimed warm-up prefill.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from timing import median_ms  # noqa: E402  (bench/ is not a package)

from graftlm.kernels.cpu import packed


def _times(w: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> list[float]:
    """ms of: the weight-only kernel on bf16 rows; the fp32 GEMM; the bf16 GEMM (dequantized w)."""
    xb = x.bfloat16()
    return [
        median_ms(lambda: torch.ops.aten._weight_int8pack_mm(xb, w, s.bfloat16())),
        median_ms(lambda: F.linear(x, w.float()) * s),
        median_ms(lambda: F.linear(xb, w.bfloat16()).float() * s),
    ]


def kernels() -> None:
    print(f"gemm_dtype() here: {packed.gemm_dtype()}; capability {torch.backends.cpu.get_cpu_capability()}")
    print(
        "| N x K | rows | int8pack bf16 ms | fp32 GEMM ms | bf16 GEMM ms | GFLOP/s int8pack / fp32 / bf16 |"
    )
    print("|---|---|---|---|---|---|")
    for n, k in ((1408, 2048), (2048, 1408)):
        w = torch.randint(-127, 127, (n, k), dtype=torch.int8)
        s = torch.rand(n)
        for rows in (4, 16, 64, 512):
            ms = _times(w, s, torch.randn(rows, k))
            flops = 2 * rows * n * k / 1e6
            rate = " / ".join(f"{flops / m:.0f}" for m in ms)
            print(f"| {n} x {k} | {rows} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | {rate} |")


def models(paths: list[str], repeat: int) -> None:
    import graftlm

    gemm = packed._dequantized_gemm

    def weight_only(x, w, scale):
        return torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w, scale.bfloat16()).float()

    ids = torch.randint(10, 1000, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    print("\n| model | many-row GEMM prefill tok/s | weight-only kernel prefill tok/s |")
    print("|---|---|---|")
    for path in paths:
        llm = graftlm.load(path, rules="auto", progress=False)
        llm.engine.prefill(ids)  # warm-up: first-touch of the weights and allocator
        rates = {"gemm": [], "weight-only": []}
        try:
            for _ in range(repeat):
                for name, fn in (("gemm", gemm), ("weight-only", weight_only)):
                    packed._dequantized_gemm = fn
                    start = time.perf_counter()
                    llm.engine.prefill(ids)
                    rates[name].append(512 / (time.perf_counter() - start))
        finally:
            packed._dequantized_gemm = gemm
        shown = {k: ", ".join(f"{r:.1f}" for r in v) for k, v in rates.items()}
        print(f"| {path.rsplit('/', 1)[-1]} | {shown['gemm']} | {shown['weight-only']} |")
        del llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="*", default=[])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels()
    if args.models:
        models(args.models, args.repeat)


if __name__ == "__main__":
    main()
