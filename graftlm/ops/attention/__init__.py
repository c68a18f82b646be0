"""Attention operators. Importing this package registers them (`attention.gqa`, `attention.mla`, `attention.sparse`)."""

from graftlm.ops.attention import gqa, mla, sparse  # noqa: F401  (registers the operators)
from graftlm.ops.attention.gqa import GQAttention
from graftlm.ops.attention.mla import MLAttention
from graftlm.ops.attention.sparse import SparseAttention, SparseSettings, configure_sparse

__all__ = ["GQAttention", "MLAttention", "SparseAttention", "SparseSettings", "configure_sparse"]
