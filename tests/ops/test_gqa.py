"""`attention.gqa` against the transformers attention modules it replaces, and its refusals."""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import graftlm
from graftlm.inject.registry import get_operator
from graftlm.kernels.cpu import fused, qblocks
from graftlm.models.compat import library_cache_arg
from graftlm.ops.attention import gqa
from graftlm.ops.attention.gqa import GQAttention
from graftlm.weights.convert import convert
from tests.inject.helpers import random_model, tiny_config
from tests.models.tiny import VOCAB, make_model

CACHE = library_cache_arg()
ARCHS = ["llama", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma3"]


def _position_embeddings(model, x, positions, layer_idx):
    rotary = model.model.rotary_emb
    if isinstance(getattr(rotary, "rope_type", None), dict):  # Gemma 3: sliding and full frequencies
        return rotary(x, positions, model.config.layer_types[layer_idx])
    return rotary(x, positions)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("last", [False, True])  # Gemma 3: layer 0 slides, the last (of 6) is global
def test_one_layer_matches_hf_through_prefill_and_decode(arch, last):
    config = tiny_config(arch)
    model = random_model(config)
    layer = config.num_hidden_layers - 1 if last else 0
    hf = model.model.layers[layer].self_attn
    op = GQAttention(f"model.layers.{layer}.self_attn", None, config, copy.deepcopy(hf))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, config.hidden_size, generator=g)
    caches = DynamicCache(config=config), DynamicCache(config=config)
    # a 12-token prompt, then 8 single tokens: past Gemma 3's sliding window of 8
    spans = [(0, 12)] + [(t, t + 1) for t in range(12, 20)]
    with torch.inference_mode():
        for s0, s1 in spans:
            positions = torch.arange(s0, s1)[None].expand(2, -1)
            pe = _position_embeddings(model, x, positions, layer)
            want = hf(x[:, s0:s1], position_embeddings=pe, attention_mask=None, **{CACHE: caches[0]})[0]
            got = op(x[:, s0:s1], position_embeddings=pe, attention_mask=None, **{CACHE: caches[1]})[0]
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(caches[0].layers[layer].keys, caches[1].layers[layer].keys):
        assert torch.equal(a, b)  # the cache holds the same keys, bit for bit


def test_rope_kernel_is_apply_rotary_pos_emb_bit_for_bit():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    for batch, length, heads, dim in [(1, 1, 4, 256), (2, 7, 3, 64)]:
        q = torch.randn(batch, length, heads, dim, generator=g)
        k = torch.randn(batch, length, 1, dim, generator=g)
        angles = torch.randn(batch, length, dim // 2, generator=g) * 10
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        assert torch.equal(fused.rope_(q.clone(), cos, sin).transpose(1, 2), want_q)
        assert torch.equal(fused.rope_(k.clone(), cos[:1], sin[:1]).transpose(1, 2)[:1], want_k[:1])


def test_rope_partial_rotation_leaves_the_rest(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 2, 16, generator=g)
    angles = torch.randn(1, 3, 4, generator=g)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    kernel = fused.rope_(x.clone(), cos, sin)
    assert torch.equal(kernel[..., 8:], x[..., 8:])
    monkeypatch.setattr(qblocks, "available", lambda: False)  # the torch fallback
    torch.testing.assert_close(fused.rope_(x.clone(), cos, sin), kernel, rtol=0, atol=0)


def test_refuses_other_attention_classes():
    config = tiny_config("deepseek_v2")
    hf = random_model(config).model.layers[0].self_attn
    with pytest.raises(ValueError, match=r"attention\.gqa at 'a'.*not DeepseekV2Attention"):
        GQAttention("a", None, config, hf)
    assert get_operator("attention.gqa") is GQAttention


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_auto_rules_decode_matches_hf_past_the_window(arch, tmp_path):
    """Token by token through the engine, 30 steps (Gemma 3's sliding window is 8): the same
    next-token logits as the plain transformers model on the same file."""
    folder = tmp_path / arch
    make_model(arch, folder)
    path = convert(folder, tmp_path / "f32.gguf", "f32")
    plain, fast = graftlm.load(path, progress=False), graftlm.load(path, rules="auto", progress=False)
    assert any(isinstance(m, GQAttention) for m in fast.model.modules())
    ids = torch.randint(3, VOCAB, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    states = []
    for llm in (plain, fast):
        logits, cache = llm.engine.prefill(ids)
        if llm is fast:  # the in-place KV layers, full and (Gemma 3) sliding
            kinds = {type(layer).__name__ for layer in cache.layers}
            assert kinds <= {"GrowingLayer", "GrowingSlidingLayer"} and "GrowingLayer" in kinds, kinds
        steps = [logits]
        for t in range(30):
            token = torch.tensor([[int(steps[-1].argmax())]])
            logits, cache = llm.engine.forward(token, cache, len(ids) + t)
            steps.append(logits)
        states.append(torch.stack(steps))
    torch.testing.assert_close(states[1], states[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not qblocks.available(), reason="needs graftlm's C kernels")
def test_sliding_window_decode_attends_the_masks_span(tmp_path, monkeypatch):
    """Gemma 3 on GGUF blocks (the one-token program), 30 decode steps past its window of 8: each
    sliding layer's mask allows one span of keys, and at every call `attend` on that span gives what
    SDPA gives with the mask over all the cached keys. Compared call by call on the same inputs:
    end to end, quantized weights quantize the activations too, and a last-bit difference can flip
    one int8 rounding and move the logits by ~1e-3."""
    make_model("gemma3", tmp_path / "hf")
    llm = graftlm.load(convert(tmp_path / "hf", tmp_path / "q8.gguf", "q8_0"), rules="auto", progress=False)
    ids = torch.randint(3, VOCAB, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    kernels, real_span, real_attend = qblocks._qkernels, gqa.mask_span, qblocks._qkernels.attend
    pending, spans, checked = [], [], []  # a sliding layer's mask until its attend; every span; attends

    def spied_span(mask, keys):
        spans.append(real_span(mask, keys))
        pending.append((mask.clone(), keys, spans[-1]))
        return spans[-1]

    def floats(address, n):
        return torch.frombuffer((ctypes.c_float * n).from_address(address), dtype=torch.float32).clone()

    def spied_attend(q, heads, kv_heads, dim, k, v, length, stride, scale, out, threads, *rest):
        assert not rest
        mask, total, span = pending.pop() if pending else (None, length, (0, length))  # full layers: no mask
        assert not pending and span is not None and span[1] - span[0] == length, (span, length)
        first = span[0]
        k0, v0 = k - 4 * first * dim, v - 4 * first * dim  # the first cached key's row
        rows = (kv_heads - 1) * stride + total * dim
        keys = floats(k0, rows).as_strided((1, kv_heads, total, dim), (0, stride, dim, 1))
        values = floats(v0, rows).as_strided((1, kv_heads, total, dim), (0, stride, dim, 1))
        query = floats(q, heads * dim).view(1, kv_heads, heads // kv_heads, dim)
        expect = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
        real_attend(q, heads, kv_heads, dim, k, v, length, stride, scale, out, threads)
        checked.append(first)
        torch.testing.assert_close(floats(out, heads * dim), expect.reshape(-1), rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(gqa, "mask_span", spied_span)
    monkeypatch.setattr(kernels, "attend", spied_attend)
    for given in (None, DynamicCache()):  # the engine's (sliding layers keep the window), then all keys
        logits, cache = llm.engine.prefill(ids, given)
        for t in range(30):
            logits, cache = llm.engine.forward(torch.tensor([[(7 * t) % VOCAB]]), cache, len(ids) + t)
    assert spans and all(s is not None and 0 < s[1] - s[0] <= 8 for s in spans), spans[:5]
    assert len(checked) > len(spans) and max(checked) > 0  # full layers too; windows past the first key


@pytest.mark.skipif(not qblocks.available(), reason="needs graftlm's C kernels")
def test_mask_span_takes_one_contiguous_span_of_a_bool_row():
    def span(values, dtype=torch.bool):
        mask = torch.tensor(values, dtype=dtype).view(1, 1, 1, -1)
        return fused.mask_span(mask, mask.shape[-1])

    assert span([1, 1, 1, 1]) == (0, 4)  # causal: every key
    assert span([0, 0, 1, 1, 1]) == (2, 5)  # a sliding window past its length
    assert span([1, 1, 0]) == (0, 2)
    assert span([0, 1, 0, 1]) is None  # a hole (padding): SDPA with the mask
    assert span([0, 0, 0]) is None  # nothing allowed: SDPA decides
    assert span([0.0, 0.0, 0.0], torch.float32) is None  # an additive float mask
    rows = torch.ones(1, 1, 2, 3, dtype=torch.bool)  # two queries
    assert fused.mask_span(rows, 3) is None and fused.mask_span(rows[..., :1, :], 4) is None
