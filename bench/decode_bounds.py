"""What bounds CPU decode: weight GB/s of torch's kernels, and where a decode step spends its time.

    python bench/decode_bounds.py [--model PATH] [--threads 1] [--steps 5]

Part 1 times one-row matmuls on matrices too large for the caches (so the figures are DRAM reads):
torch's int8 and int4 weight-only kernels against plain fp32 and bf16 GEMV and graftlm's one-row C
kernel on Q8_0 blocks, with `torch.sum` over the same bytes for the bandwidth (more types:
bench/qblocks.py), and a greedy pick over Gemma 3's 262,144 logits by torch's and numpy's argmax. Part 2 (with --model) loads the model with rules="auto" and times `--steps` decode
steps three ways: as they run, with the time inside graftlm's C kernels summed, and with those kernels
replaced by no-ops (what Python, transformers' modules and the small torch ops cost alone). Then it
prints the torch ops' shares of a step (the profiler does not see the C kernels).
"""

from __future__ import annotations

import argparse
import ctypes
import time

import graftlm  # first: it sets OpenMP's thread waiting, which libgomp reads when torch loads it

# isort: split
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from timing import median_ms  # (bench/ is not a package: run as python bench/decode_bounds.py)

from graftlm.kernels.cpu import qblocks


def kernels() -> None:
    n, k = 262144, 640  # Gemma's output head: 168M weights, far beyond any cache
    x = torch.randn(1, k, dtype=torch.bfloat16)
    w8 = torch.randint(-127, 127, (n, k), dtype=torch.int8)
    s8 = torch.rand(n, dtype=torch.bfloat16)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.rand(k // 32, n, 2, dtype=torch.bfloat16)
    wf = torch.randn(n, k)
    wb = wf.bfloat16()
    cases = {
        "_weight_int8pack_mm (int8)": (lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s8), 1.0),
        "_weight_int4pack_mm_for_cpu (int4)": (
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, 32, sz),
            0.5,
        ),
        "F.linear fp32": (lambda: torch.nn.functional.linear(x.float(), wf), 4.0),
        "F.linear bf16": (lambda: torch.nn.functional.linear(x, wb), 2.0),
    }
    if qblocks.available():  # graftlm's one-row C kernel on Q8_0 blocks (the real head's type)
        blocks = np.random.default_rng(0).integers(-127, 128, (n, k // 32, 34), dtype=np.int8)
        blocks[..., :2] = np.full((n, k // 32, 1), 0.01, dtype=np.float16).view(np.int8)  # each block's scale
        rows = blocks.reshape(n, -1).view(np.uint8)
        prepared, xf = qblocks.prepare(Q.Q8_0, rows, k), x.float()
        raw = torch.from_numpy(rows.reshape(-1).view(np.int64))
        cases["graftlm C kernel, Q8_0 blocks"] = (lambda: qblocks.matmul_prepared(prepared, xf), 34 / 32)
        cases["torch.sum over the Q8_0 bytes"] = (lambda: raw.sum(), 34 / 32)
    print(f"one-row matmul on a {n} x {k} matrix, {torch.get_num_threads()} thread(s)")
    for name, (fn, bytes_per_weight) in cases.items():
        ms = median_ms(fn)
        print(f"  {name:38s} {ms:8.1f} ms  {n * k * bytes_per_weight / ms / 1e6:5.1f} GB/s of weights")
    logits = torch.randn(1, n)  # a greedy pick over Gemma 3's vocabulary, as sample_next makes it
    print(f"greedy pick over {n} logits: torch.argmax {median_ms(lambda: logits.argmax(dim=-1)):.3f} ms, "
          f"numpy argmax {median_ms(lambda: logits.numpy().argmax(axis=-1)):.3f} ms")  # fmt: skip


def zero_matmul(qtype, w, row_bytes, n, k, x, m, out, ldo, threads) -> None:
    """A no-op product that writes zeros (garbage from torch.empty could be subnormal floats, which
    would slow the operators downstream)."""
    for i in range(m):
        ctypes.memset(out + i * ldo * 4, 0, n * 4)


def zero_matmul_experts(qtype, ptrs, count, row_bytes, n, k, x, x_rows, out, threads, sets=1) -> None:
    ctypes.memset(out, 0, sets * count * n * 4)


def zero_matmul_many(k, x, m, threads, specs) -> None:
    for _, _, _, n, out, ldo in specs:
        zero_matmul(0, 0, 0, n, k, x, m, out, ldo, threads)


class Kernels:
    """The extension with its matrix products replaced (the fused row operators stay real)."""

    def __init__(self, real, matmul, matmul_experts, matmul_many) -> None:
        self.real, self.matmul, self.matmul_experts, self.matmul_many = (
            real,
            matmul,
            matmul_experts,
            matmul_many,
        )

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def profile(path: str, steps: int) -> None:
    llm = graftlm.load(path, rules="auto", progress=False)
    engine = llm.engine
    _, cache = engine.prefill(list(range(100, 164)))
    token = torch.tensor([[5]])
    position = 64

    def step_ms() -> float:
        nonlocal cache, position
        start = time.perf_counter()
        for _ in range(steps):
            _, cache = engine.forward(token, cache, position)
            position += 1
        return (time.perf_counter() - start) / steps * 1e3

    step_ms()  # warm-up
    print(f"\n{steps} decode steps of {path}: {step_ms():.1f} ms per step")
    if qblocks.available():
        real, spent = qblocks._qkernels, [0.0]

        def timed(fn):
            def call(*args):
                start = time.perf_counter()
                fn(*args)
                spent[0] += time.perf_counter() - start

            return call

        try:
            qblocks._qkernels = Kernels(
                real, timed(real.matmul), timed(real.matmul_experts), timed(real.matmul_many)
            )
            total = step_ms()
            print(f"  in graftlm's C kernels: {spent[0] / steps * 1e3:.1f} of {total:.1f} ms")
            qblocks._qkernels = Kernels(real, zero_matmul, zero_matmul_experts, zero_matmul_many)
            print(f"  with the C kernels as no-ops: {step_ms():.1f} ms (Python, modules, small torch ops)")
        finally:
            qblocks._qkernels = real
    with torch.profiler.profile() as prof:
        step_ms()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print("  torch ops by share of the profiled time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"    {e.key:40s} {100 * e.self_cpu_time_total / total:5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a GGUF to profile (e.g. ~/.cache/graftlm/bench/dsv2lite-4l-q4_k_m.gguf)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels()
    if args.model:
        profile(args.model, args.steps)


if __name__ == "__main__":
    main()
