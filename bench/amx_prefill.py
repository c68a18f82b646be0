"""A 512-token prefill with the AMX tile kernel on and off, alternating in one process.

    python bench/amx_prefill.py MODEL.gguf [--threads 2] [--runs 7] [--prompt-tokens 512] [--band ROWS]

Loads MODEL with rules="auto", then times prefills alternately with every GGUF matrix routed as
`PackedMatrix` routes it where the CPU has AMX (graftlm/kernels/cpu/packed.py QBLOCK_AMX_ROWS) and
with the tile kernel off (the one-row kernel up to `qblock_rows()`, the dequantize + GEMM path above),
after one untimed prefill, and prints both series and their medians. On a CPU without AMX both
series run the same path. With `--band ROWS` the second series keeps the tile kernel on and widens
every matrix's band to ROWS rows instead (whether the band's upper bounds still hold).
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
    ap.add_argument("--band", type=int, help="compare with the tile kernel up to this many rows, not off")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = graftlm.load(args.model, rules="auto", progress=False)
    mats = matrices(llm.model)
    on = {id(m): (m.kernel_rows, m.amx_rows) for m in mats}
    if args.band:
        other = f"band{args.band}"
        alt = {id(m): (m.kernel_rows, args.band) if m.amx_rows else on[id(m)] for m in mats}
    else:
        other = "off"
        alt = {
            id(m): (packed.qblock_rows(packed.Q[m.source_type]), 0) if m.amx_rows else on[id(m)] for m in mats
        }
    print(
        f"{sum(1 for m in mats if m.amx_rows)} of {len(mats)} matrices take the tile kernel (amx: {qblocks.amx()})"
    )
    ids = torch.randint(10, 1000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.engine.prefill(ids)
    runs: dict[str, list[float]] = {"amx": [], other: []}
    for i in range(args.runs):
        pairs = [("amx", on), (other, alt)]
        for name, setting in pairs if i % 2 == 0 else pairs[::-1]:  # alternate which goes first
            for m in mats:
                m.kernel_rows, m.amx_rows = setting[id(m)]
            start = time.perf_counter()
            llm.engine.prefill(ids)
            runs[name].append(args.prompt_tokens / (time.perf_counter() - start))
    for name, tok_s in runs.items():
        print(
            f"{name:8s} median {statistics.median(tok_s):6.1f} tok/s  runs {' '.join(f'{t:.0f}' for t in tok_s)}"
        )


if __name__ == "__main__":
    main()
