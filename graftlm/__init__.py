"""graftlm: run GGUF and Hugging Face LLMs, Mixture-of-Experts first, on CPU or one modest GPU."""

from graftlm.errors import GraftError

__version__ = "0.1.0"

__all__ = ["GraftError", "LLM", "load", "__version__"]


def __getattr__(name: str):
    # The public API imports torch and transformers; keep `import graftlm` itself cheap.
    if name in ("LLM", "load"):
        from graftlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'graftlm' has no attribute {name!r}")
