"""Two builds of graftlm's C kernels, interleaved in one process: whole prefills and per-matrix products.

    python bench/ab_builds.py MODEL.gguf --base REV [--threads 2] [--runs 9] [--prompt-tokens 512]
                                         [--matrices | --matrices-only]

This machine's speed drifts by up to 2-3x within minutes, so two runs one after the other do not
compare builds. This script builds `graftlm/_qkernels` as it was at git revision REV (in a temporary
worktree) and loads it beside the working tree's build, then alternates them in one process on one
loaded model: each round runs a 512-token prefill with the old build, then with the new. It prints
both series and their medians. With --matrices it also times the tile kernels on every expert
matrix of each shape, streaming through all of them as a prefill does (cold weights): the int8 one
(`matmul_amx`) at 16 and 48 rows and, where both builds have it and the CPU has AMX-BF16, the bf16
one (`matmul_amx_bf16`) at 1 row (its dequantization alone, nearly), 48 and 512; --matrices-only
skips the prefills (for an old build that lacks a kernel the routing picks). Build the working tree first (`python setup.py build_ext --inplace`). Which kernel a
product takes is the working tree's choice (graftlm/kernels/cpu/packed.py), so an old build that
lacks a kernel the new routing picks raises rather than compares.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import graftlm  # first: it sets OpenMP's thread waiting, which libgomp reads when torch loads it

# isort: split
import torch
from amx_prefill import matrices  # (bench/ is not a package: run as python bench/ab_builds.py)

from graftlm.kernels.cpu import qblocks

ROOT = Path(__file__).resolve().parent.parent


def load_extension(path: Path) -> ModuleType:
    """An extension module from `path`, loaded as its own copy (its own static state)."""
    loader = importlib.machinery.ExtensionFileLoader("graftlm._qkernels", str(path))
    spec = importlib.util.spec_from_file_location("graftlm._qkernels", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def build_at(rev: str, out_dir: Path) -> Path:
    """Build the extension of revision `rev` in a temporary worktree; returns a copy of the .so."""
    tree = out_dir / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
    try:
        subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace", "--force"],
            cwd=tree,
            check=True,
            capture_output=True,
        )
        built = list((tree / "graftlm").glob("_qkernels*.so"))
        if not built:
            raise SystemExit(f"the extension of {rev} did not build (see setup.py)")
        so = out_dir / f"old-{built[0].name}"
        so.write_bytes(built[0].read_bytes())
        return so
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def prefills(llm, builds: dict[str, ModuleType], runs: int, tokens: int) -> None:
    ids = torch.randint(10, 1000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.engine.prefill(ids)
    times: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(runs):
        for name, module in builds.items():
            qblocks._qkernels = module
            t = time.perf_counter()
            llm.engine.prefill(ids)
            times[name].append(time.perf_counter() - t)
    print(f"{tokens}-token prefill, tok/s (rounds in order):")
    for name, ts in times.items():
        print(f"  {name:4s} median {tokens / statistics.median(ts):7.1f}   {[round(tokens / t) for t in ts]}")


def tile_products(llm, builds: dict[str, ModuleType], runs: int) -> None:
    groups: dict[tuple, list] = {}
    for m in matrices(llm.model):
        if m.amx_band:
            groups.setdefault((m.source_type, m.n, m.k), []).append(m)
    kernels = [("matmul_amx", (16, 48))]
    if qblocks.amx_bf16() and all(hasattr(module, "matmul_amx_bf16") for module in builds.values()):
        kernels.append(("matmul_amx_bf16", (1, 48, 512)))
    threads = torch.get_num_threads()
    print("tile kernels per matrix, us (median of rounds over every matrix of the shape):")
    for kernel, row_counts in kernels:
        for rows in row_counts:
            for (kind, n, k), group in groups.items():
                if len(group) < 8:  # not an expert shape
                    continue
                x, out = torch.randn(rows, k), torch.empty(rows, n)
                times: dict[str, list[float]] = {name: [] for name in builds}
                for _ in range(runs):
                    for name, module in builds.items():
                        fn = getattr(module, kernel)
                        t = time.perf_counter()
                        for m in group:
                            fn(*m.prepared, x.data_ptr(), rows, out.data_ptr(), n, threads)
                        times[name].append((time.perf_counter() - t) / len(group))
                old, new = (statistics.median(times[name]) * 1e6 for name in builds)
                print(
                    f"  {kernel}, {rows:3d} rows, {kind} {n} x {k} ({len(group)} matrices): "
                    f"old {old:.0f}, new {new:.0f} ({old / new:.2f}x)"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--base", required=True, help="git revision of the old build")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--matrices", action="store_true", help="also time the tile kernels per expert matrix")
    what.add_argument("--matrices-only", action="store_true", help="time the tile kernels only, no prefills")
    args = ap.parse_args()
    if qblocks._qkernels is None:
        raise SystemExit("the working tree's extension is not built: python setup.py build_ext --inplace")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        builds = {"old": load_extension(build_at(args.base, Path(tmp))), "new": qblocks._qkernels}
        llm = graftlm.load(args.model, rules="auto", progress=False)
        print(f"{args.model}: old = {args.base}, new = the working tree; {args.threads} threads")
        if not args.matrices_only:
            prefills(llm, builds, args.runs, args.prompt_tokens)
        if args.matrices or args.matrices_only:
            tile_products(llm, builds, args.runs)
        qblocks._qkernels = builds["new"]


if __name__ == "__main__":
    main()
