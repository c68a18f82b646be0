"""A 512-token prefill with the AMX tile kernel on and off, alternating in one process.

    python bench/amx_prefill.py MODEL.gguf [--threads 2] [--runs 7] [--prompt-tokens 512]

Loads MODEL with rules="auto", then times prefills alternately with every GGUF matrix routed as
`PackedMatrix` routes it where the CPU has AMX (graftlm/kernels/cpu/packed.py QBLOCK_AMX_ROWS) and
with the tile kernel off (the one-row kernel up to `qblock_rows()`, the dequantize + GEMM path above),
after one untimed prefill, and prints both series and their medians. On a CPU without AMX both
series run the same path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import graftlm
from graftlm.kernels.cpu import packed, qblocks
from graftlm.ops.packed import GatePair


def matrices(model: torch.nn.Module) -> list[packed.PackedMatrix]:
    """Every PackedMatrix of the model's linear.cpu and experts.cpu operators (gate/up pairs too)."""
    found = []
    for module in model.modules():
        mats = (
            [getattr(module, "packed", None)]
            + list(getattr(module, "gate_up", []))
            + list(getattr(module, "down", []))
        )
        for m in mats:
            found += [m.gate, m.up] if isinstance(m, GatePair) else [m]
    return [m for m in found if isinstance(m, packed.PackedMatrix)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = graftlm.load(args.model, rules="auto", progress=False)
    mats = matrices(llm.model)
    on = {id(m): (m.kernel_rows, m.amx_rows) for m in mats}
    off = {id(m): (packed.qblock_rows(packed.Q[m.source_type]), 0) if m.amx_rows else on[id(m)] for m in mats}
    print(
        f"{sum(1 for m in mats if m.amx_rows)} of {len(mats)} matrices take the tile kernel (amx: {qblocks.amx()})"
    )
    ids = torch.randint(10, 1000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.engine.prefill(ids)
    runs: dict[str, list[float]] = {"amx": [], "off": []}
    for _ in range(args.runs):
        for name, setting in (("amx", on), ("off", off)):
            for m in mats:
                m.kernel_rows, m.amx_rows = setting[id(m)]
            start = time.perf_counter()
            llm.engine.prefill(ids)
            runs[name].append(args.prompt_tokens / (time.perf_counter() - start))
    for name, tok_s in runs.items():
        print(
            f"{name:4s} median {statistics.median(tok_s):6.1f} tok/s  runs {' '.join(f'{t:.0f}' for t in tok_s)}"
        )


if __name__ == "__main__":
    main()
