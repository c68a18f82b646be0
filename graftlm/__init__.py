"""graftlm: run GGUF and Hugging Face LLMs, Mixture-of-Experts first, on CPU or one modest GPU."""

import os

# torch's CPU threads wait for work in OpenMP, which by default spins for up to ~200 ms: a core burns
# while idle, and when anything else runs on the machine every parallel op waits for a descheduled
# spinner (Gemma 3 270M decode at 2 threads beside one busy process: 2.1 tok/s spinning, 15.9 tok/s
# passive). Fully passive waiting costs decode a futex wake-up per parallel op instead (Gemma decode
# at 2 threads on a quiet machine: 15.8 tok/s passive, 26.1 spinning). So threads spin briefly, then
# sleep: PASSIVE with GOMP_SPINCOUNT=10000 (libgomp reckons ~100,000 spins per ms, so ~0.1 ms) kept most
# of the quiet-machine speed (22.5 tok/s) and never holds a core once work stops. BENCHMARKS.md
# ("Thread waiting") has the commands behind these figures. libgomp reads these once, when torch
# loads it, so they are set before graftlm imports torch; a policy or spin count the user set is kept.
WAIT_POLICY_SET_BY_GRAFTLM = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
if WAIT_POLICY_SET_BY_GRAFTLM:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "10000"


def _keep_freed_memory() -> bool:
    """glibc's malloc hands blocks of 128 KB-32 MB back to the OS when they are freed (mmap, and a heap
    trimmed past 2x that threshold), so every prefill page-faults its large temporaries (GEMM outputs,
    the activation's output, the experts' rows) in again, zeroed: ~60,000 faults, ~250 MB, each
    Qwen2-MoE-shape 512-token prefill here (`bench/prefill_parts.py` counts them). Kept instead (allocations up to 32 MB from the heap, and up
    to 1 GiB of freed heap kept per malloc arena), a warm prefill faults ~1,000 pages. Peak memory is
    unchanged: the memory kept is what the peak touched. Not where the user tunes malloc (any MALLOC_*
    variable, or glibc.malloc tunables in GLIBC_TUNABLES) or set GRAFTLM_MALLOC=system; glibc only
    (musl and other platforms keep their own policy)."""
    if (
        os.environ.get("GRAFTLM_MALLOC") == "system"
        or any(k.startswith("MALLOC_") for k in os.environ)
        or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return False
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


MALLOC_TUNED_BY_GRAFTLM = _keep_freed_memory()

from graftlm.errors import GraftError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["GraftError", "LLM", "load", "__version__"]


def __getattr__(name: str):
    # The public API imports torch and transformers; keep `import graftlm` itself cheap.
    if name in ("LLM", "load"):
        from graftlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'graftlm' has no attribute {name!r}")
