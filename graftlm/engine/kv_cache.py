"""Key/value cache layers that grow in place: transformers' DynamicLayer and
DynamicSlidingWindowLayer, without a `torch.cat` of the whole cache per decoded token.

transformers' dynamic layers append by concatenation, so every one-token step copies the layer's
whole cache: at 512 cached tokens that is 19 MB a step for Gemma 3 270M (18 layers x K and V x
512 x 256 x 4 bytes) and 34 MB for four Qwen2-MoE layers (16 KV heads of 128), as much as the weights a step reads.
These layers keep keys and values in buffers [B, H, capacity, D] that grow by at least a quarter
(and `chunk` tokens) when full, and expose `keys`/`values` as views of the filled part, so n tokens
cost O(n) copying in all. Everything else is the parent class's: `get_seq_length`,
`get_mask_sizes`, `crop`, `reset` and the batch operations work on `keys`/`values`, and when one of
them replaces those tensors the next append starts a fresh buffer from them.

The sliding layer returns what DynamicSlidingWindowLayer returns (the kept window and the new
tokens) and keeps the last `sliding_window - 1` tokens; its window slides forward in the buffer and
moves to a fresh buffer when it reaches the end. Appends only ever write past everything handed out,
so tensors a caller got earlier never change. With `record_past` (assisted decoding) it defers to
the parent class. Offloading (`DynamicCache(offloading=True)`) is not supported: the buffers stay
where they were made (graftlm's engine does not offload).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

CHUNK = 256  # tokens of headroom a (re)allocation adds, at least


class _Buffered:
    """keys/values as views [B, H, start:start + length] of two buffers [B, H, capacity, D]."""

    chunk = CHUNK

    def _reset_buffers(self) -> None:
        self._kbuf = self._vbuf = None
        self._start = self._length = 0
        self._exposed = (None, None)

    def _owns_views(self) -> bool:
        """Whether keys/values are still the views this layer made: the very tensors `_expose` set
        (a parent method that replaces them, `crop` or the batch operations, assigns new ones)."""
        exposed_k, exposed_v = getattr(self, "_exposed", (None, None))
        return exposed_k is not None and self.keys is exposed_k and self.values is exposed_v

    def _append(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if not self._owns_views():
            old_k = self.keys if self.keys is not None and self.keys.dim() == 4 else None
            old_v = self.values if old_k is not None else None
            self._reset_buffers()
            if old_k is not None and old_k.shape[-2]:
                self._allocate(old_k, old_v, old_k.shape[-2] + new)
        kbuf, vbuf = self._kbuf, self._vbuf
        same = (
            kbuf is not None
            and kbuf.shape[:2] == key_states.shape[:2]
            and kbuf.shape[-1] == key_states.shape[-1]
            and vbuf.shape[-1] == value_states.shape[-1]
            and kbuf.dtype == key_states.dtype
            and kbuf.device == key_states.device
        )
        if not same:
            old = (self.keys, self.values) if self._length else (None, None)
            self._allocate(*old, self._length + new, like=(key_states, value_states))
        elif self._start + self._length + new > kbuf.shape[-2]:
            # a fresh buffer (never the front of this one: tensors already handed out stay intact)
            self._allocate(self.keys, self.values, self._length + new)
        end = self._start + self._length
        self._kbuf.narrow(2, end, new).copy_(key_states)
        self._vbuf.narrow(2, end, new).copy_(value_states)
        self._length += new
        self._expose()
        return self.keys, self.values

    def _allocate(self, keys, values, need: int, like=None) -> None:
        ref_k, ref_v = like if like is not None else (keys, values)
        capacity = need + max(self.chunk, need // 4)
        b, h = ref_k.shape[:2]
        kbuf = ref_k.new_empty(b, h, capacity, ref_k.shape[-1])
        vbuf = ref_v.new_empty(b, h, capacity, ref_v.shape[-1])
        length = 0 if keys is None else keys.shape[-2]
        if length:
            kbuf[:, :, :length] = keys
            vbuf[:, :, :length] = values
        self._kbuf, self._vbuf, self._start, self._length = kbuf, vbuf, 0, length

    def _expose(self) -> None:
        s, n = self._start, self._length
        self.keys = self._kbuf.narrow(2, s, n)
        self.values = self._vbuf.narrow(2, s, n)
        self._exposed = (self.keys, self.values)


class GrowingLayer(_Buffered, DynamicLayer):
    """DynamicLayer with amortized in-place appends."""

    def __init__(self) -> None:
        super().__init__()
        self._reset_buffers()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append(key_states, value_states)

    def reset(self) -> None:
        super().reset()
        self._reset_buffers()


class GrowingSlidingLayer(_Buffered, DynamicSlidingWindowLayer):
    """DynamicSlidingWindowLayer with amortized in-place appends."""

    def __init__(self, sliding_window: int, **kwargs) -> None:
        super().__init__(sliding_window, **kwargs)
        self._reset_buffers()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.record_past:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        full_k, full_v = self._append(key_states, value_states)
        # what the parent keeps, its slice [-sliding_window + 1:] (all of it for a window of 1)
        kept = self._length if self.sliding_window <= 1 else min(self._length, self.sliding_window - 1)
        if kept != self._length:
            self._start += self._length - kept
            self._length = kept
            self._expose()
        return full_k, full_v

    def reset(self) -> None:
        super().reset()
        self._reset_buffers()
