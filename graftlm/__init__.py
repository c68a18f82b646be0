"""graftlm: run GGUF and Hugging Face LLMs, Mixture-of-Experts first, on CPU or one modest GPU."""

import os

# torch's CPU threads wait for work in OpenMP, which by default spins: a core burns while idle, and
# when anything else runs on the machine every parallel op waits for a descheduled spinner (Gemma
# 270M decode at 2 threads beside one busy process: 2.1 tok/s spinning, 15.9 tok/s passive).
# libgomp reads this once, when torch loads it, so it is set before graftlm imports torch; a value
# the user set is kept.
WAIT_POLICY_SET_BY_GRAFTLM = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from graftlm.errors import GraftError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["GraftError", "LLM", "load", "__version__"]


def __getattr__(name: str):
    # The public API imports torch and transformers; keep `import graftlm` itself cheap.
    if name in ("LLM", "load"):
        from graftlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'graftlm' has no attribute {name!r}")
