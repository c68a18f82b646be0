"""KV caches: the engine asks the model for one, or falls back to transformers' DynamicCache.

A model may offer `make_cache()`; the engine treats whatever it returns as opaque and only passes
it back to the model. Otherwise the cache is a transformers DynamicCache in which any module that
owns its layer's cache (an injected attention operator with a latent, block or sparse cache)
contributes that layer: such a module has `layer_idx` and `make_cache_layer()`, which returns a
transformers `CacheLayerMixin`. The engine knows nothing of what those layers hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer


def contributed_layers(model: torch.nn.Module) -> Iterator[tuple[int, CacheLayerMixin]]:
    """(layer index, fresh cache layer) from each module of `model` that owns its layer's cache."""
    for module in model.modules():
        factory = getattr(module, "make_cache_layer", None)
        layer = factory() if callable(factory) else None
        if layer is not None:  # None: the module keeps transformers' own layer (e.g. sliding window)
            yield int(module.layer_idx), layer


def make_cache(model: torch.nn.Module) -> Any:
    """A fresh, empty cache for one sequence of `model`."""
    factory = getattr(model, "make_cache", None)
    if callable(factory):
        return factory()
    cache = DynamicCache(config=model.config)
    for index, layer in contributed_layers(model):
        while len(cache.layers) <= index:
            cache.layers.append(DynamicLayer())
        cache.layers[index] = layer
    return cache
