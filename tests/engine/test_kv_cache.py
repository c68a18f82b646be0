"""The growing KV-cache layers against transformers' DynamicLayer / DynamicSlidingWindowLayer."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from graftlm.engine.kv_cache import GrowingLayer, GrowingSlidingLayer

PAIRS = {
    "full": (DynamicLayer, GrowingLayer, ()),
    "window 8": (DynamicSlidingWindowLayer, GrowingSlidingLayer, (8,)),
    "window 300": (DynamicSlidingWindowLayer, GrowingSlidingLayer, (300,)),
}
# the parent's slice [-0:] keeps everything; its crop refuses past the window, so states only
EDGE = {"window 1": (DynamicSlidingWindowLayer, GrowingSlidingLayer, (1,))}


def _step(g, n: int):
    return torch.randn(2, 3, n, 16, generator=g), torch.randn(2, 3, n, 8, generator=g)


def _same(ref, new) -> None:
    assert torch.equal(ref.keys, new.keys) and torch.equal(ref.values, new.values)
    assert ref.get_seq_length() == new.get_seq_length()
    assert ref.get_mask_sizes(1) == new.get_mask_sizes(1)


@pytest.mark.parametrize("kind", [*PAIRS, *EDGE])
def test_same_states_as_transformers_and_no_copy_per_token(kind):
    ref_cls, new_cls, args = {**PAIRS, **EDGE}[kind]
    ref, new = ref_cls(*args), new_cls(*args)
    g = torch.Generator().manual_seed(0)
    buffers = set()
    for step in range(700):
        k, v = _step(g, 12 if step == 0 else (5 if step % 50 == 0 else 1))  # a prompt, then tokens and chunks
        a, b = ref.update(k, v), new.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), step
        _same(ref, new)
        buffers.add(new._kbuf.data_ptr())
    assert len(buffers) <= 12  # (re)allocated a few times over 700 appends, not per token


@pytest.mark.parametrize("kind", list(PAIRS))
def test_parent_operations_still_work(kind):
    """crop, batch selection and reset replace keys/values; the next append starts from them."""
    ref_cls, new_cls, args = PAIRS[kind]
    ref, new = ref_cls(*args), new_cls(*args)
    g = torch.Generator().manual_seed(1)
    for n in (4, 1, 1):  # under the smallest window: transformers refuses to crop a full window
        k, v = _step(g, n)
        ref.update(k, v), new.update(k, v)
    ref.crop(-2), new.crop(-2)
    _same(ref, new)
    for layer in (ref, new):
        layer.batch_select_indices(torch.tensor([1]))
    k, v = _step(g, 1)
    a, b = ref.update(k[:1], v[:1]), new.update(k[:1], v[:1])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _same(ref, new)
    ref.reset(), new.reset()
    k, v = _step(g, 3)
    a, b = ref.update(k, v), new.update(k, v)
    assert torch.equal(a[0], b[0])
    _same(ref, new)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_tensors_handed_out_never_change(kind):
    """Appends write past everything returned before, and a full buffer moves to a fresh one, so
    what update() returned (and earlier keys) stays as it was, as with transformers' layers."""
    _, new_cls, args = PAIRS[kind]
    layer = new_cls(*args)
    g = torch.Generator().manual_seed(2)
    k, v = _step(g, 12)
    first = layer.update(k, v)
    kept = [t.clone() for t in first]
    old_keys, old_copy = layer.keys, layer.keys.clone()
    for _ in range(600):
        layer.update(*_step(g, 1))
    assert torch.equal(first[0], kept[0]) and torch.equal(first[1], kept[1])
    assert torch.equal(old_keys, old_copy)
