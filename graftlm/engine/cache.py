"""KV caches: the engine asks the model for one, or falls back to transformers' DynamicCache.

Injected attention operators (latent, block or sparse caches) give the model a `make_cache()`
method; the engine treats whatever it returns as opaque and only passes it back to the model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


def make_cache(model: torch.nn.Module) -> Any:
    """A fresh, empty cache for one sequence of `model`."""
    factory = getattr(model, "make_cache", None)
    if callable(factory):
        return factory()
    return DynamicCache(config=model.config)
