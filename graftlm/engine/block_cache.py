"""A block KV-cache layer for block-sparse attention: keys and values in fixed-size blocks, with
per-block representative keys ("anchors") kept up to date as blocks fill.

One layer holds `keys` and `values` as `[batch, kv_heads, capacity, head_dim]` buffers whose
capacity is a whole number of blocks, so `keys.view(B, Hkv, capacity // block, block, D)` gives
the blocks without a copy. The buffers are preallocated (`reserve` tokens at the first write) and
otherwise grow by whole blocks, by at least half their size each time, never per token.

Anchors describe each full block (a block of `block_size` tokens, split into `anchor_num` equal
parts, each part with its own anchor):
- `max`: the per-channel maximum of the part's keys;
- `mean`: the per-channel mean;
- `quest`: the per-channel maximum and minimum (Quest: a query q bounds a key's score by
  sum_i max(q_i M_i, q_i m_i));
- `dynamic`: the keys of the `anchor_num` tokens of the block that received the most attention
  (from the last prompt queries at the end of prefill, and from decode queries while the block was
  in the local window); computed when the block is scored, not as it fills.
The static anchors (`max`, `mean`, `quest`) are computed in `update` for each block that fills.
Quest's maximum is a true maximum: a block of negative keys has negative maxima (no zero start).

The layer also keeps what the attention operator observes at the end of a prefill: the last
`observe` queries (a SnapKV-style observation window) and, per token, the attention it received
(`received`), which the operator fills and reads for preselection and dynamic anchors.
The layer follows transformers' `CacheLayerMixin`, so it sits in a transformers `Cache` beside
ordinary (sliding-window) layers and works with HF's masking.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

ANCHOR_TYPES = ("max", "mean", "quest", "dynamic")


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class BlockLayer(CacheLayerMixin):
    """One layer's block KV cache: `keys[:, :, :length]` and `values[:, :, :length]` are the cached tokens."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        block_size: int = 128,
        anchor_type: str = "quest",
        anchor_num: int = 1,
        *,
        kv_dtype: torch.dtype | None = None,
        reserve: int | None = None,
        observe: int = 32,
        grow_blocks: int = 16,
    ):
        super().__init__()
        if block_size < 1 or anchor_num < 1 or block_size % anchor_num:
            raise ValueError(
                f"block cache: block_size ({block_size}) must be a positive multiple of anchor_num ({anchor_num})"
            )
        if anchor_type not in ANCHOR_TYPES:
            raise ValueError(
                f"block cache: anchor_type must be one of {', '.join(ANCHOR_TYPES)}, got {anchor_type!r}"
            )
        self.block_size = int(block_size)
        self.anchor_type = anchor_type
        self.anchor_num = int(anchor_num)
        self.kv_dtype = kv_dtype
        self.reserve = int(reserve) if reserve else 0
        self.observe = int(observe)
        self.grow_tokens = int(grow_blocks) * self.block_size
        self.keys: torch.Tensor | None = None  # the whole buffers; HF's views are set by _sync_views
        self.values: torch.Tensor | None = None
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None  # [B, Hkv, blocks, A, D]: max / mean / dynamic keys
        self.lo: torch.Tensor | None = None  # quest's minima, same shape
        self.anchored = 0  # full blocks whose anchors `hi`/`lo` hold (static types)
        self.received: torch.Tensor | None = None  # [B, Hkv, capacity] fp32 attention received
        self.obs_queries: torch.Tensor | None = None  # [B, H, <=observe, D] the last prefill queries
        self.obs_positions: torch.Tensor | None = None  # their cache slots
        self.prefill_end = 0  # cache length at the end of the last multi-token call
        self.observed = False  # whether `received` holds the observation of the last prefill
        self.dynamic_done = 0  # blocks whose dynamic anchors are final
        self.preselected: torch.Tensor | None = None  # [B, 1 or Hkv, blocks] bool, or None
        self.length = 0
        self.grows = 0

    # -- sizes -----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 0 if self.key_buffer is None else self.key_buffer.shape[2]

    @property
    def full_blocks(self) -> int:
        return self.length // self.block_size

    def bytes_per_token(self) -> int:
        """Key and value bytes one token takes in this layer."""
        if self.key_buffer is None:
            return 0
        b, h, _, d = self.key_buffer.shape
        return 2 * b * h * d * self.key_buffer.element_size()

    def blocks(self, which: str = "keys") -> torch.Tensor:
        """The key (or value) buffer viewed as [B, Hkv, capacity / block, block, D]."""
        buf = self.key_buffer if which == "keys" else self.value_buffer
        b, h, cap, d = buf.shape
        return buf.view(b, h, cap // self.block_size, self.block_size, d)

    def gather(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of whole blocks, contiguous [B, Hkv, n * block, D].

        `blocks` is [n] (the same blocks for every batch row and head) or [B, 1 or Hkv, n]. One
        `index_select` on the buffers viewed as rows of a block each: a plain copy of the blocks.
        """
        batch, heads, capacity, dim = self.key_buffer.shape
        per_head = capacity // self.block_size
        if blocks.dim() == 1:
            blocks = blocks.view(1, 1, -1)
        blocks = blocks.expand(batch, heads, blocks.shape[-1])
        base = torch.arange(batch * heads, device=blocks.device).view(batch, heads, 1) * per_head
        rows = (blocks + base).flatten()
        shape = (batch, heads, blocks.shape[-1] * self.block_size, dim)
        keys = self.key_buffer.view(-1, self.block_size * dim).index_select(0, rows).view(shape)
        values = self.value_buffer.view(-1, self.block_size * dim).index_select(0, rows).view(shape)
        return keys, values

    # -- writing ---------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype = self.kv_dtype or key_states.dtype
        self.device = key_states.device
        self.is_initialized = True

    def _reserve(self, like: torch.Tensor, needed: int) -> None:
        batch, heads, _, dim = like.shape
        if self.key_buffer is not None and self.key_buffer.shape[:2] != (batch, heads):
            raise ValueError(
                f"block cache holds batch x heads {tuple(self.key_buffer.shape[:2])}, got a write of {(batch, heads)}"
            )
        if needed <= self.capacity:
            return
        step = max(self.grow_tokens, self.capacity // 2)
        capacity = _round_up(max(needed, self.capacity + step, self.reserve), self.block_size)
        blocks = capacity // self.block_size

        def grown(
            old: torch.Tensor | None, shape: tuple, dtype: torch.dtype, used: int, axis: int, zero=False
        ):
            new = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=self.device)
            if old is not None and used:
                new.narrow(axis, 0, used).copy_(old.narrow(axis, 0, used))
            return new

        # zeroed: a gathered block's slots past `length` must hold finite values (they are masked)
        shape = (batch, heads, capacity, dim)
        self.key_buffer = grown(self.key_buffer, shape, self.dtype, self.length, 2, zero=True)
        self.value_buffer = grown(self.value_buffer, shape, self.dtype, self.length, 2, zero=True)
        anchor_shape = (batch, heads, blocks, self.anchor_num, dim)
        self.hi = grown(self.hi, anchor_shape, self.dtype, self.anchored, 2)
        self.lo = (
            grown(self.lo, anchor_shape, self.dtype, self.anchored, 2)
            if self.anchor_type == "quest"
            else None
        )
        self.received = grown(
            self.received, (batch, heads, capacity), torch.float32, self.length, 2, zero=True
        )
        if self.preselected is not None:
            pad = blocks - self.preselected.shape[-1]
            self.preselected = torch.nn.functional.pad(self.preselected, (0, pad), value=True)
        self.grows += 1

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append keys/values [B, Hkv, S, D]; return every cached key and value (views [B, Hkv, T, D])."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        self._reserve(key_states, self.length + new)
        span = slice(self.length, self.length + new)
        self.key_buffer[:, :, span].copy_(key_states)
        self.value_buffer[:, :, span].copy_(value_states)
        self.received[:, :, span].zero_()
        self.length += new
        if self.anchor_type != "dynamic":
            self.update_anchors()
        self._sync_views()
        return self.keys, self.values

    def update_anchors(self, anchor_type: str | None = None, anchor_num: int | None = None) -> None:
        """Compute the static anchors of every block filled since the last call.

        Another type or count than the layer was made with recomputes the anchors of every block.
        """
        anchor_type = anchor_type or self.anchor_type
        anchor_num = anchor_num or self.anchor_num
        if (anchor_type, anchor_num) != (self.anchor_type, self.anchor_num):
            if self.block_size % anchor_num:
                raise ValueError(f"block_size {self.block_size} is not a multiple of anchor_num {anchor_num}")
            self.anchor_type, self.anchor_num, self.anchored = anchor_type, anchor_num, 0
            self.dynamic_done = 0
            self.hi = self.lo = None
            if self.key_buffer is not None:
                b, h, cap, d = self.key_buffer.shape
                shape = (b, h, cap // self.block_size, anchor_num, d)
                self.hi = torch.empty(shape, dtype=self.dtype, device=self.device)
                self.lo = torch.empty_like(self.hi) if anchor_type == "quest" else None
        if anchor_type == "dynamic" or self.key_buffer is None:
            return
        start, stop = self.anchored, self.full_blocks
        if stop <= start:
            return
        b, h, _, _, d = self.hi.shape
        parts = self.blocks("keys")[:, :, start:stop].reshape(b, h, stop - start, anchor_num, -1, d)
        if anchor_type == "mean":
            self.hi[:, :, start:stop] = parts.float().mean(dim=4).to(self.dtype)
        else:
            self.hi[:, :, start:stop] = parts.amax(dim=4)
            if anchor_type == "quest":
                self.lo[:, :, start:stop] = parts.amin(dim=4)
        self.anchored = stop

    def dynamic_anchors(self, start: int, stop: int) -> None:
        """Set `hi` for blocks [start, stop) to the keys of each block's most-attended tokens.

        Blocks done before keep their anchors (a block's received attention stops changing once it
        leaves the local window); a new observation (`observed` reset) redoes them all.
        """
        start = max(start, self.dynamic_done)
        if stop <= start:
            return
        self.dynamic_done = stop
        b, h, _, a, d = self.hi.shape
        received = self.received[:, :, start * self.block_size : stop * self.block_size]
        top = received.view(b, h, stop - start, self.block_size).topk(a, dim=-1).indices  # [B, Hkv, n, A]
        keys = self.blocks("keys")[:, :, start:stop]  # [B, Hkv, n, block, D]
        self.hi[:, :, start:stop] = keys.gather(3, top.unsqueeze(-1).expand(b, h, stop - start, a, d))

    def record_queries(self, query: torch.Tensor) -> None:
        """Keep the last `observe` queries [B, H, S, D] of a multi-token call (after `update`)."""
        new = query.shape[2]
        positions = torch.arange(self.length - new, self.length, device=query.device)
        if self.obs_queries is not None and new < self.observe and self.prefill_end == self.length - new:
            query = torch.cat([self.obs_queries.to(query.dtype), query], dim=2)
            positions = torch.cat([self.obs_positions, positions])
        self.obs_queries = query[:, :, -self.observe :].detach().clone()
        self.obs_positions = positions[-self.observe :].clone()
        self.prefill_end = self.length
        self.observed = False
        self.dynamic_done = 0
        self.preselected = None

    def _sync_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    # -- transformers' bookkeeping ---------------------------------------------------------

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget the cached tokens; the buffers are kept for the next sequence."""
        self.length = self.anchored = self.prefill_end = self.dynamic_done = 0
        self.obs_queries = self.obs_positions = self.preselected = None
        self.observed = False
        if self.key_buffer is not None:
            self._sync_views()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (HF's convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self.length = max(self.length + tokens_to_remove, 0)
        self.anchored = min(self.anchored, self.full_blocks)
        self.dynamic_done = min(self.dynamic_done, self.full_blocks)
        self.prefill_end = min(self.prefill_end, self.length)
        self.obs_queries = self.obs_positions = self.preselected = None
        self.observed = False
        if self.key_buffer is not None:
            self._sync_views()

    def offload(self) -> None:
        pass  # the block cache lives where it was made (CPU RAM by default)

    def prefetch(self) -> None:
        pass

    def _batch_apply(self, fn) -> None:
        for name in ("key_buffer", "value_buffer", "hi", "lo", "received", "obs_queries", "preselected"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        if self.key_buffer is not None:
            self._sync_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_apply(lambda t: t[indices])

    def __repr__(self) -> str:
        return (
            f"BlockLayer(block={self.block_size}, anchors={self.anchor_type}x{self.anchor_num}, "
            f"length={self.length}, capacity={self.capacity})"
        )
