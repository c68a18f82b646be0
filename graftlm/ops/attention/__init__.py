"""Attention operators. Importing this package registers them (`attention.mla`, `attention.sparse`)."""

from graftlm.ops.attention import mla, sparse  # noqa: F401  (registers the operators)
from graftlm.ops.attention.mla import MLAttention
from graftlm.ops.attention.sparse import SparseAttention, SparseSettings, configure_sparse

__all__ = ["MLAttention", "SparseAttention", "SparseSettings", "configure_sparse"]
