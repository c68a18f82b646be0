"""A latent KV-cache layer: one preallocated buffer per layer, holding one compressed vector per token.

DeepSeek's multi-head latent attention (MLA) caches, per token and layer, the `kv_lora_rank`
latent (after `kv_a_layernorm`) and the `qk_rope_head_dim` rotary key, never the per-head keys and
values. `LatentLayer` stores both side by side in one buffer `[batch, capacity, latent + rope]`,
so attention reads a token's whole cache entry as one contiguous row (one GEMM gives the scores
from the latent and the rotary part together, and the latent half is the value).

The buffer is allocated on the first write and grows in steps: to at least `chunk` tokens past
what is needed, and by at least half its size (so n tokens cost O(n) copying in all, never one
`torch.cat` per token). `max_tokens` (the model's context) caps a growth step, not what is asked.

The layer follows transformers' `CacheLayerMixin`, so it sits in a transformers `Cache` beside
ordinary layers and works with HF's own masking (`get_mask_sizes`) and with HF's DeepSeek
attention modules, which pass the latent as `key_states` [B, 1, S, latent] and the rotary key
as `value_states` [B, 1, S, rope].
"""

from __future__ import annotations

import logging

import torch
from transformers.cache_utils import CacheLayerMixin

log = logging.getLogger(__name__)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class LatentLayer(CacheLayerMixin):
    """One layer's latent cache: `buffer[:, :length]` holds [latent | rotary key] per token."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, latent_dim: int, rope_dim: int, *, chunk: int = 256, max_tokens: int | None = None):
        super().__init__()
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.latent_dim = int(latent_dim)
        self.rope_dim = int(rope_dim)
        self.chunk = int(chunk)
        self.max_tokens = int(max_tokens) if max_tokens else None
        self.buffer: torch.Tensor | None = None
        self.length = 0
        self.grows = 0  # how many times the buffer was (re)allocated

    @property
    def width(self) -> int:
        """Values stored per token: latent + rotary key."""
        return self.latent_dim + self.rope_dim

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[1]

    def bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Cache bytes one token takes in this layer (in the buffer's dtype, or `dtype`)."""
        dtype = dtype or (self.buffer.dtype if self.buffer is not None else torch.float32)
        return self.width * torch.empty((), dtype=dtype).element_size()

    # -- writing ---------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, batch: int, needed: int, dtype: torch.dtype, device: torch.device) -> None:
        if self.buffer is not None and self.buffer.shape[0] != batch:
            raise ValueError(f"latent cache holds batch {self.buffer.shape[0]}, got a write of batch {batch}")
        if needed <= self.capacity:
            return
        step = max(self.chunk, self.capacity // 2)
        capacity = _round_up(max(needed, self.capacity + step), self.chunk)
        if self.max_tokens is not None and needed <= self.max_tokens:
            capacity = min(capacity, self.max_tokens)
        buffer = torch.empty(batch, capacity, self.width, dtype=dtype, device=device)
        if self.length:
            buffer[:, : self.length].copy_(self.buffer[:, : self.length])
        log.debug("latent cache: %d -> %d tokens", self.capacity, capacity)
        self.buffer = buffer
        self.grows += 1

    def append(self, entries: torch.Tensor) -> torch.Tensor:
        """Write entries [B, S, latent + rope] after the cached ones; return all of them [B, length, width]."""
        batch, new, width = entries.shape
        if width != self.width:
            raise ValueError(f"latent cache stores {self.width} values per token, got {width}")
        if not self.is_initialized:
            self.lazy_initialization(entries, entries)
        self._reserve(batch, self.length + new, entries.dtype, entries.device)
        self.buffer[:, self.length : self.length + new].copy_(entries)
        self.length += new
        self._sync_views()
        return self.entries()

    def entries(self) -> torch.Tensor:
        """The cached entries [B, length, latent + rope], a view of the buffer."""
        if self.buffer is None:
            raise RuntimeError("the latent cache is empty")
        return self.buffer[:, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' protocol: latent [B, 1, S, latent] and rotary key [B, 1, S, rope] in; all cached out."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, new = key_states.shape[0], key_states.shape[-2]
        self._reserve(batch, self.length + new, key_states.dtype, key_states.device)
        span = slice(self.length, self.length + new)
        self.buffer[:, span, : self.latent_dim].copy_(key_states[:, 0])
        self.buffer[:, span, self.latent_dim :].copy_(value_states[:, 0])
        self.length += new
        self._sync_views()
        return self.keys, self.values

    def _sync_views(self) -> None:
        # `keys` / `values` as HF's DynamicLayer would hold them for DeepSeek: views, no copies.
        cached = self.buffer[:, None, : self.length]
        self.keys = cached[..., : self.latent_dim]
        self.values = cached[..., self.latent_dim :]

    # -- transformers' bookkeeping ---------------------------------------------------------

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget the cached tokens; the buffer is kept for the next sequence."""
        self.length = 0
        if self.buffer is not None:
            self._sync_views()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (HF's convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self.length = max(self.length + tokens_to_remove, 0)
        if self.buffer is not None:
            self._sync_views()

    def offload(self) -> None:
        if self.buffer is not None:
            self.buffer = self.buffer.to("cpu", non_blocking=True)
            self._sync_views()

    def prefetch(self) -> None:
        if self.buffer is not None and self.buffer.device != self.device:
            self.buffer = self.buffer.to(self.device, non_blocking=True)
            self._sync_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.buffer is not None:
            self.buffer = self.buffer.index_select(0, beam_idx.to(self.buffer.device))
            self._sync_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.buffer is not None:
            self.buffer = self.buffer.repeat_interleave(repeats, dim=0)
            self._sync_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.buffer is not None:
            self.buffer = self.buffer[indices]
            self._sync_views()

    def __repr__(self) -> str:
        return (
            f"LatentLayer(latent={self.latent_dim}, rope={self.rope_dim}, "
            f"length={self.length}, capacity={self.capacity})"
        )
