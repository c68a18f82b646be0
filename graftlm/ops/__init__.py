"""Injected operators. Importing this package registers the built-in ones by short name."""

from graftlm.ops import experts, experts_cpu, linear, linear_cpu, model, moe, rope  # noqa: F401  (each registers its operators)
from graftlm.ops.base import InjectedModule, LinearBase

__all__ = ["InjectedModule", "LinearBase"]
