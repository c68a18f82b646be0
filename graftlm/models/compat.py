"""What differs between the transformers releases graftlm supports (pyproject: >=5.20,<6).

transformers 5.24 renamed the KV-cache argument of models, decoder layers and attention modules
from `past_key_values` to `cache` (the old name is deprecated until 5.40), and the output field
with it. Code that calls a transformers module, or is called by one, goes through these helpers.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from transformers.models.llama import modeling_llama

NAMES = ("cache", "past_key_values")


@functools.cache
def library_cache_arg() -> str:
    """The KV-cache argument name of this transformers release's models, layers and attention."""
    params = inspect.signature(modeling_llama.LlamaAttention.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(fn: Callable) -> str:
    """The name `fn` takes the KV cache by: whichever of `cache`/`past_key_values` it declares,
    else (only **kwargs) the name this transformers release uses."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return library_cache_arg()
    return next((n for n in NAMES if n in params), library_cache_arg())


def given_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache a module was called with, under either name."""
    return cache if cache is not None else past_key_values


def output_cache(out: Any) -> Any:
    """The cache a model's output carries (`cache` from 5.24, `past_key_values` before); None if none."""
    for name in NAMES:
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None
