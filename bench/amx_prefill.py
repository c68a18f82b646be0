"""A 512-token prefill with the AMX tile kernels as routed and routed otherwise, alternating in one process.

    python bench/amx_prefill.py MODEL.gguf [--threads 2] [--runs 7] [--prompt-tokens 512]
                                           [--band ROWS | --int8 | --ungrouped | --group-above ROWS]

Loads MODEL with rules="auto", then times prefills alternately with every GGUF matrix routed as
`PackedMatrix` routes it where the CPU has AMX (graftlm/kernels/cpu/packed.py: the int8 tile kernel
up to QBLOCK_AMX_ROWS, or where the CPU has AMX-BF16 up to QBLOCK_AMX_INT8_ROWS and the bf16 tile
kernel above) and with the tile kernels off (the one-row kernel up to `qblock_rows()`, the
dequantize + GEMM path above), after one untimed prefill, and prints both series and their medians.
On a CPU without AMX both series run the same path. The second series instead:
- `--band ROWS`: the int8 tile kernel up to ROWS rows, no bf16 tiles (whether a band's bounds hold);
- `--int8`: the int8 tile kernel to its own QBLOCK_AMX_ROWS bound and dequantize + GEMM above, no
  bf16 tiles (the routing before the bf16 tile kernel);
- `--ungrouped`: the same routing of every matrix, but a prefill's routed experts one by one instead
  of in experts.cpu's two grouped bf16 tile calls;
- `--group-above ROWS`: the grouped calls from ROWS + 1 rows up instead of from the one-row
  kernel's bound (experts with fewer rows one by one).
The other series run every expert one by one, except `--group-above`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import graftlm
from graftlm.kernels.cpu import packed, qblocks
from graftlm.ops.experts_cpu import ExpertsCPU
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
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--band", type=int, help="compare with the int8 tile kernel up to this many rows")
    mode.add_argument("--int8", action="store_true", help="compare with the int8 tile kernel's own band")
    mode.add_argument("--ungrouped", action="store_true", help="compare with the routed experts one by one")
    mode.add_argument(
        "--group-above", type=int, help="compare with grouped experts only above this many rows"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = graftlm.load(args.model, rules="auto", progress=False)
    mats = matrices(llm.model)
    experts = [m for m in llm.model.modules() if isinstance(m, ExpertsCPU)]
    grouped = {id(op): op._tile_rows for op in experts}  # None: every expert one by one
    # each matrix's (kernel_rows, amx_rows, bf16_tiles); amx_band: whether it takes the tile kernels
    on = {id(m): (m.kernel_rows, m.amx_rows, m.bf16_tiles) for m in mats}
    if args.band:
        other, alt = f"band{args.band}", {id(m): (m.kernel_rows, args.band, False) for m in mats}
    elif args.int8:
        other, alt = "int8", {id(m): (m.kernel_rows, m.amx_band, False) for m in mats}
    elif args.ungrouped or args.group_above is not None:
        other, alt = "ungrouped", dict(on)
        if args.group_above is not None:
            other = f"above{args.group_above}"
    else:
        other = "off"
        alt = {id(m): (packed.qblock_rows(packed.Q[m.source_type]), 0, False) for m in mats}
    alt = {id(m): alt[id(m)] if m.amx_band else on[id(m)] for m in mats}
    alt_grouped = {
        id(op): None if args.group_above is None or rows is None else [args.group_above] * len(rows)
        for op, rows in ((op, grouped[id(op)]) for op in experts)
    }
    print(
        f"{sum(1 for m in mats if m.amx_band)} of {len(mats)} matrices take the tile kernels "
        f"(amx: {qblocks.amx()}, amx-bf16: {qblocks.amx_bf16()})"
    )
    ids = torch.randint(10, 1000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.engine.prefill(ids)
    runs: dict[str, list[float]] = {"amx": [], other: []}
    for i in range(args.runs):
        pairs = [("amx", on, grouped), (other, alt, alt_grouped)]
        for name, setting, groups in pairs if i % 2 == 0 else pairs[::-1]:  # alternate which goes first
            for m in mats:
                m.kernel_rows, m.amx_rows, m.bf16_tiles = setting[id(m)]
            for op in experts:
                op._tile_rows = groups[id(op)]
            start = time.perf_counter()
            llm.engine.prefill(ids)
            runs[name].append(args.prompt_tokens / (time.perf_counter() - start))
    for name, tok_s in runs.items():
        print(
            f"{name:8s} median {statistics.median(tok_s):6.1f} tok/s  runs {' '.join(f'{t:.0f}' for t in tok_s)}"
        )


if __name__ == "__main__":
    main()
