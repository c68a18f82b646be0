"""`graftlm bench MODEL`: prefill and decode tokens/s, peak RSS and achieved GB/s."""

from __future__ import annotations

import argparse
import json
import sys
import time

from graftlm.cli.common import add_model_args, at_least, load_llm


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure prefill and decode speed", description=__doc__)
    add_model_args(p)
    p.add_argument("--prompt-tokens", type=at_least(1), default=512, metavar="N")
    p.add_argument(
        "--gen-tokens",
        type=at_least(2, " (the first token comes from the prefill)"),
        default=128,
        metavar="N",
        help="(>= 2: the first comes from the prefill)",
    )
    p.add_argument(
        "--repeat", type=at_least(1), default=3, metavar="R", help="runs to take the median of (default 3)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from graftlm.engine.bench import run_bench

    t0 = time.perf_counter()
    llm = load_llm(args)
    load_seconds = time.perf_counter() - t0
    result = run_bench(llm.engine, args.prompt_tokens, args.gen_tokens, args.repeat)
    result.load_seconds = load_seconds
    result.mmap = args.mmap
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=1)
        print()
        return 0
    print(f"machine   {result.machine}, {result.threads} threads")
    where = "memory-mapped" if args.mmap else "read into RAM (--no-mmap)"
    gpu = "".join(f", peak cuda:{i} {m:.0f} MiB" for i, m in enumerate(result.peak_gpu_mib))
    print(f"load      {load_seconds:.1f} s, weights {where}, peak RSS {result.peak_rss_mib:.0f} MiB{gpu}")
    print(
        f"prefill   {result.prefill_tok_s:8.1f} tok/s  ({args.prompt_tokens} tokens, median of {args.repeat})"
    )
    print(
        f"decode    {result.decode_tok_s:8.1f} tok/s  ({result.generated_tokens} tokens"
        f"{f' of the {args.gen_tokens} asked: the context ends' if result.generated_tokens < args.gen_tokens else ''}; "
        f"{result.bytes_per_token / 1e6:.3g} MB of weights per token = {result.decode_gb_s:.1f} GB/s)"
    )
    if len(result.bytes_by_device) > 1:  # weights on several devices: each one's share of the rate
        print(
            "          "
            + ", ".join(
                f"{d} {n / 1e6:.3g} MB = {n * result.decode_tok_s / 1e9:.1f} GB/s"
                for d, n in sorted(result.bytes_by_device.items())
            )
        )
    return 0
