"""Attention operators. Importing this package registers them (`attention.mla`)."""

from graftlm.ops.attention import mla  # noqa: F401  (registers attention.mla)
from graftlm.ops.attention.mla import MLAttention

__all__ = ["MLAttention"]
