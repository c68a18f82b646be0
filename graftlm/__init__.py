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

from graftlm.errors import GraftError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["GraftError", "LLM", "load", "__version__"]


def __getattr__(name: str):
    # The public API imports torch and transformers; keep `import graftlm` itself cheap.
    if name in ("LLM", "load"):
        from graftlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'graftlm' has no attribute {name!r}")
