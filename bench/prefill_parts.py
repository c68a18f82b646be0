"""Where a prefill's time goes, and how each part scales from one thread to two.

    python bench/prefill_parts.py MODEL.gguf [--prompt-tokens 512] [--rounds 4]

Loads MODEL with rules="auto" and runs a prefill of random tokens at one thread, then at two, in
alternating rounds (this machine's speed drifts within minutes, so the two are interleaved). Each
call into graftlm's C kernels is timed by name (the tile kernel `matmul_amx`, `dequantize`, ...),
as are torch's GEMMs (`linear`: the many-row bf16 path) and SDPA; "other" is the rest (Python, the
experts' glue, small torch ops). Prints the median time of each part per thread count and the
speed-up from one thread to two, and the median minor page faults per prefill (`GRAFTLM_MALLOC=system`
shows glibc's own policy: a Qwen2-MoE-shape prefill then faults tens of thousands of pages).
"""

from __future__ import annotations

import argparse
import collections
import resource
import statistics
import time

import graftlm  # first: it sets OpenMP's thread waiting, which libgomp reads when torch loads it

# isort: split
import torch
import torch.nn.functional as F

from graftlm.kernels.cpu import qblocks

spent: dict[str, float] = collections.defaultdict(float)


def timed(name: str, fn):
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start

    return call


class TimedKernels:
    """graftlm._qkernels with every function timed under its own name."""

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name: str):
        value = getattr(self._module, name)
        return timed(name, value) if callable(value) else value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    llm = graftlm.load(args.model, rules="auto", progress=False)
    vocab = llm.engine.vocab_size or 1000
    ids = torch.randint(
        10, vocab - 1, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    llm.engine.prefill(ids)  # warm-up
    if qblocks.available():
        qblocks._qkernels = TimedKernels(qblocks._qkernels)
    linear, sdpa = torch._C._nn.linear, F.scaled_dot_product_attention
    torch._C._nn.linear = F.linear = timed("linear", linear)
    F.scaled_dot_product_attention = timed("sdpa", sdpa)
    parts: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            spent.clear()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            llm.engine.prefill(ids)
            total = time.perf_counter() - start
            parts[threads, "minor page faults"].append(
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            )
            parts[threads, "other"].append(total - sum(spent.values()))
            parts[threads, "total"].append(total)
            for name, seconds in spent.items():
                parts[threads, name].append(seconds)
    print(f"{args.model}, {args.prompt_tokens}-token prefill, medians of {args.rounds} interleaved rounds")
    print("| part | one thread ms | two threads ms | speed-up |")
    print("|---|---|---|---|")
    for name in sorted({name for _, name in parts} - {"minor page faults"}, key=lambda n: (n == "total", n)):
        one, two = (statistics.median(parts[t, name]) if parts[t, name] else 0.0 for t in (1, 2))
        print(f"| {name} | {one * 1e3:.0f} | {two * 1e3:.0f} | {one / two if two else 0:.2f}x |")
    one, two = (statistics.median(parts[t, "minor page faults"]) for t in (1, 2))
    print(f"minor page faults per prefill (median): {one:.0f} at one thread, {two:.0f} at two")


if __name__ == "__main__":
    main()
