"""Whether fusing a prefill's sibling GEMMs into one would pay: oneDNN bf16 at prefill's row count.

    python bench/gemm_fusion.py [--threads 2] [--rows 512] [--rounds 3]

Times, alternating in rounds, separate `F.linear` calls on matrices that share their input (the
shared expert's gate and up, 5632 each; q, k and v, 2048 each; an expert's gate and up, 1408 each;
all 2048 wide) against one `F.linear` on the rows stacked, and prints the ratio per round.
"""

from __future__ import annotations

import argparse

import graftlm  # noqa: F401 - first: it sets OpenMP's thread waiting before torch loads libgomp

# isort: split
import torch
import torch.nn.functional as F
from timing import median_ms  # (bench/ is not a package: run as python bench/gemm_fusion.py)

SHAPES = {"shared expert gate + up": (5632, 2), "q + k + v": (2048, 3), "expert gate + up": (1408, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.rows, 2048).bfloat16()
    print(f"bf16 F.linear, {args.rows} rows x 2048, {args.threads} thread(s): separate / fused ms (ratio)")
    for name, (n, parts) in SHAPES.items():
        ws = [torch.randn(n, 2048).bfloat16() for _ in range(parts)]
        fused = torch.cat(ws)
        for _ in range(args.rounds):
            apart = median_ms(lambda: [F.linear(x, w) for w in ws])  # noqa: B023 - called at once
            one = median_ms(lambda: F.linear(x, fused))  # noqa: B023
            print(f"  {name:24s} {apart:7.2f} / {one:7.2f} ({apart / one:.2f}x)")


if __name__ == "__main__":
    main()
