"""Injected operators. Importing this package registers the built-in ones by short name."""

from graftlm.ops import (  # noqa: F401  (each registers its operators)
    decoder_cpu,
    embedding_cpu,
    experts,
    experts_cpu,
    experts_gpu,
    linear,
    linear_cpu,
    linear_gpu,
    mlp_cpu,
    model,
    moe,
    norm_cpu,
    rope,
)
from graftlm.ops.base import InjectedModule, LinearBase

__all__ = ["InjectedModule", "LinearBase"]
