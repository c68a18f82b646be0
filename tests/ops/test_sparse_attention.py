"""attention.sparse: block-sparse decode over a block KV cache, against HF's dense attention.

With `topk` covering every block the sparse path (selection, gathering, log-sum-exp merging) must
give HF's logits; with a small budget each decode step must attend to no more than the budget, pick
the blocks that matter, and stay finite. Every GQA architecture, every anchor type.
"""

from __future__ import annotations

import math

import pytest
import torch

from graftlm.engine.block_cache import BlockLayer
from graftlm.engine.cache import make_cache
from graftlm.inject import apply, load_rules, plan
from graftlm.inject.rules import ARCH_RULES
from graftlm.models.build import build_meta_model
from graftlm.models.compat import library_cache_arg
from graftlm.ops.attention.sparse import (
    SparseAttention,
    SparseSettings,
    block_logits,
    configure_sparse,
    merge_attention,
    partial_attention,
    sparse_rules,
)
from graftlm.weights.memory import StateDictSource
from tests.inject.helpers import random_model, tiny_config

CACHE = library_cache_arg()  # the KV-cache argument: `cache` from transformers 5.24
GQA = ["llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "gemma3"]
CONTEXT = 2048  # the tiny models' max_position_embeddings here
SMALL = dict(block_size=16, initial_blocks=1, local_window=32)  # blocks exist past ~64 tokens


def _inject(name: str, hf, settings, dtype=torch.float32):
    meta = build_meta_model(tiny_config(name, max_position_embeddings=CONTEXT))
    arch_rules = (
        f"builtin:{ARCH_RULES[meta.config.model_type]}" if meta.config.model_type in ARCH_RULES else None
    )
    rules = sparse_rules(settings) + ([{"include": arch_rules}] if arch_rules else [])
    p = plan(meta, load_rules(rules))
    return apply(meta, p, source=StateDictSource(hf.state_dict()), config=meta.config, dtype=dtype)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (1, n), generator=torch.Generator().manual_seed(seed))


def _run(model, ids: torch.Tensor, prompt: int, chunk: int = 64) -> torch.Tensor:
    """Logits of ids: the prompt in chunks, then token by token through the model's cache."""
    cache = make_cache(model)
    out = []
    with torch.no_grad():
        for s in range(0, prompt, chunk):
            out.append(model(ids[:, s : min(s + chunk, prompt)], **{CACHE: cache}, use_cache=True).logits)
        for t in range(prompt, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], **{CACHE: cache}, use_cache=True).logits)
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module", params=GQA)
def hf_model(request):
    torch.set_num_threads(1)
    hf = random_model(tiny_config(request.param, max_position_embeddings=CONTEXT))
    with torch.no_grad():
        ids = _ids(260)
        return request.param, hf, ids, hf(ids).logits


def _full_layers(model) -> list[SparseAttention]:
    return [m for m in model.modules() if isinstance(m, SparseAttention) and m.is_full]


def test_full_budget_equals_dense_attention(hf_model):
    name, hf, ids, ref = hf_model
    model = _inject(name, hf, dict(SMALL, topk=1000))
    got = _run(model, ids, prompt=200)
    assert (got - ref).abs().max().item() < 1e-4
    full = _full_layers(model)
    assert full and all(m.stats["sparse_steps"] == 60 for m in full)  # the sparse path ran, every step
    assert all(m.stats["attended"] == m.stats["context"] for m in full)
    cache = make_cache(model)
    assert sum(isinstance(layer, BlockLayer) for layer in cache.layers) == len(full)


@pytest.mark.parametrize("anchor_type", ["max", "mean", "quest", "dynamic"])
@pytest.mark.parametrize("head_select", ["shared", "per_head"])
def test_every_anchor_and_head_select_exact_at_full_budget(anchor_type, head_select):
    hf = random_model(tiny_config("llama", max_position_embeddings=CONTEXT))
    ids = _ids(230, seed=1)
    with torch.no_grad():
        ref = hf(ids).logits
    settings = dict(SMALL, topk=1000, anchor_type=anchor_type, anchor_num=4, head_select=head_select)
    model = _inject("llama", hf, dict(settings, preselect=True, preselect_blocks=1000))
    assert (_run(model, ids, prompt=200) - ref).abs().max().item() < 1e-4


def test_small_budget_attends_within_budget_and_stays_close():
    hf = random_model(tiny_config("qwen3", max_position_embeddings=CONTEXT))
    ids = _ids(400, seed=2)
    settings = SparseSettings(**SMALL, topk=3, anchor_type="quest")
    model = _inject("qwen3", hf, settings)
    got = _run(model, ids, prompt=360)
    dense = _inject("qwen3", hf, settings.replace(enabled=False))
    ref = _run(dense, ids, prompt=360)
    assert torch.isfinite(got).all()
    for m in _full_layers(model):
        steps = m.stats["sparse_steps"]
        assert steps == 40
        assert m.stats["attended"] <= steps * settings.budget()
        assert m.stats["attended"] < 0.5 * m.stats["context"]
    # prefill is dense and exact; decode differs, but not wildly, from dense attention
    assert (got[:, :360] - ref[:, :360]).abs().max().item() < 1e-4
    assert (got[:, 360:] - ref[:, 360:]).abs().max().item() > 1e-4


def test_dense_layers_count_global_layers_only():
    hf = random_model(tiny_config("gemma3", max_position_embeddings=CONTEXT, sliding_window=8))
    types = hf.config.layer_types
    model = _inject("gemma3", hf, dict(SMALL, topk=2, dense_layers=1))
    attns = [layer.self_attn for layer in model.model.layers]
    assert [a.is_full for a in attns] == [t == "full_attention" for t in types]
    assert [a.global_index for a in attns if a.is_full] == list(range(types.count("full_attention")))
    _run(model, _ids(200), prompt=180)
    for a in attns:
        if a.is_full:
            assert (a.stats["sparse_steps"] == 0) == (a.global_index < 1)


def test_configure_switches_settings_without_reloading():
    hf = random_model(tiny_config("llama", max_position_embeddings=CONTEXT))
    ids = _ids(220, seed=3)
    with torch.no_grad():
        ref = hf(ids).logits
    model = _inject("llama", hf, dict(SMALL, topk=1))
    sparse = _run(model, ids, prompt=200)
    configure_sparse(model, "enabled=false")
    assert (_run(model, ids, prompt=200) - ref).abs().max().item() < 1e-4
    configure_sparse(model, dict(SMALL, topk=1))
    assert torch.equal(_run(model, ids, prompt=200), sparse)  # deterministic


def test_bf16_kv_cache_stays_close():
    hf = random_model(tiny_config("llama", max_position_embeddings=CONTEXT))
    ids = _ids(220, seed=4)
    with torch.no_grad():
        ref = hf(ids).logits
    model = _inject("llama", hf, dict(SMALL, topk=1000, kv_dtype="bfloat16"))
    got = _run(model, ids, prompt=200)
    assert (got - ref).abs().max().item() < 0.05
    assert (
        make_cache(model).layers[0].update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))[0].dtype
        == torch.bfloat16
    )


# -- the pieces ----------------------------------------------------------------------------------


def test_merge_of_parts_is_the_softmax_of_the_union():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 16, generator=g)
    k = torch.randn(2, 3, 50, 16, generator=g) * 2
    v = torch.randn(2, 3, 50, 16, generator=g)
    full, full_lse, _ = partial_attention(q, k, v, 0.25)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v
    assert torch.allclose(full, ref, atol=1e-5)
    cuts = [0, 7, 7, 31, 50]  # one empty part
    parts = [partial_attention(q, k[:, :, a:b], v[:, :, a:b], 0.25)[:2] for a, b in zip(cuts, cuts[1:])]
    out, lse = merge_attention(parts)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(lse, full_lse, atol=1e-5)


def test_quest_bounds_every_key_and_starts_from_the_true_maximum():
    g = torch.Generator().manual_seed(1)
    layer = BlockLayer(8, "quest", 2)
    keys = torch.randn(1, 2, 40, 16, generator=g) - 3.0  # mostly negative: a zero start would be wrong
    layer.update(keys, keys)
    assert layer.anchored == 5
    parts = keys.view(1, 2, 5, 2, 4, 16)
    assert torch.equal(layer.hi[:, :, :5], parts.amax(dim=4)) and torch.equal(
        layer.lo[:, :, :5], parts.amin(dim=4)
    )
    assert (layer.hi[:, :, :5] < 0).any()
    q = torch.randn(1, 2, 3, 16, generator=g)
    bound = block_logits(q, layer.hi[:, :, :5], layer.lo[:, :, :5], 1.0)  # [1, 2, 3, 5]
    exact = (q @ keys.transpose(-1, -2)).view(1, 2, 3, 5, 8).amax(dim=-1)
    assert (bound >= exact - 1e-5).all()


def test_anchors_follow_blocks_as_they_fill_and_the_cache_grows():
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 2, 300, 8, generator=g)
    layer = BlockLayer(16, "mean", 1)
    layer.grow_tokens = 32
    for s in range(0, 300, 7):  # uneven writes across block boundaries and growth steps
        layer.update(keys[:, :, s : s + 7], keys[:, :, s : s + 7] * 2)
    assert layer.length == 300 and layer.capacity % 16 == 0 and layer.grows > 2
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, keys * 2)
    assert layer.anchored == 300 // 16
    means = keys[:, :, :288].view(1, 2, 18, 1, 16, 8).mean(dim=4)
    assert torch.allclose(layer.hi[:, :, :18], means, atol=1e-6)
    reserved = BlockLayer(16, "max", reserve=1000)
    for s in range(0, 300, 7):
        reserved.update(keys[:, :, s : s + 7], keys[:, :, s : s + 7])
    assert reserved.grows == 1 and reserved.capacity >= 1000


def test_selection_finds_the_block_the_query_matches():
    torch.manual_seed(3)
    hf = random_model(tiny_config("llama", max_position_embeddings=CONTEXT))
    model = _inject("llama", hf, dict(SMALL, topk=1))
    op = model.model.layers[0].self_attn
    for anchor in ("max", "mean", "quest"):
        op.configure(SparseSettings(**SMALL, topk=2, anchor_type=anchor, anchor_num=2))
        layer = op.make_cache_layer()
        keys = torch.randn(1, 2, 320, 16) * 0.1
        direction = torch.randn(2, 16)
        keys[:, :, 16 * 9 : 16 * 10] += 3 * direction[None, :, None]  # block 9 answers the query
        layer.update(keys, torch.randn_like(keys))
        q = direction.view(1, 2, 1, 16).expand(1, 2, 2, 16)
        chosen = op._select(q, layer, 1, 18, 0.25)
        assert 9 in chosen.flatten().tolist(), anchor


def test_preselection_keeps_the_prompt_blocks_the_last_queries_attend():
    hf = random_model(tiny_config("llama", max_position_embeddings=CONTEXT))
    model = _inject("llama", hf, dict(SMALL, topk=2, preselect=True, preselect_blocks=3))
    ids = _ids(260, seed=5)
    cache = make_cache(model)
    with torch.no_grad():
        model(ids[:, :240], **{CACHE: cache}, use_cache=True)
        layer = cache.layers[0]
        assert layer.obs_queries.shape[2] == 32 and layer.prefill_end == 240 and layer.preselected is None
        model(ids[:, 240:241], **{CACHE: cache}, use_cache=True)
    keep = layer.preselected
    assert keep.shape[1] == 1 and int(keep[0, 0, :15].sum()) == 3  # 15 full prompt blocks, 3 kept
    assert keep[0, 0, 15:].all()  # later blocks stay candidates
    assert layer.received[:, :, :240].sum() > 0


# -- settings and errors -------------------------------------------------------------------------


def test_settings_parse_and_errors():
    s = SparseSettings.parse("topk=8, anchor_type=max,preselect=true,kv_dtype=bf16,cache_tokens=none")
    assert (s.topk, s.anchor_type, s.preselect, s.kv_dtype, s.cache_tokens) == (8, "max", True, "bf16", None)
    assert SparseSettings.parse("") == SparseSettings()
    with pytest.raises(ValueError, match="topkk"):
        SparseSettings.parse("topkk=3")
    with pytest.raises(ValueError, match="anchor_type"):
        SparseSettings(anchor_type="median")
    with pytest.raises(ValueError, match="multiple of anchor_num"):
        SparseSettings(block_size=100, anchor_num=3)
    with pytest.raises(ValueError, match="integer"):
        SparseSettings.parse("topk=many")
    assert SparseSettings(block_size=64, topk=4, local_window=256).budget() == 5 * 64 + 256 + 63
    assert not math.isnan(SparseSettings().budget())


def test_rule_kwargs_are_validated_with_the_rule():
    meta = build_meta_model(tiny_config("llama"))
    rule = {
        "match": {"name": r"self_attn$"},
        "replace": {"class": "attention.sparse", "kwargs": {"anchor_type": "x"}},
    }
    source = StateDictSource(random_model(tiny_config("llama")).state_dict())
    with pytest.raises(Exception, match="attention.sparse at 'model.layers.0.self_attn'.*anchor_type"):
        apply(meta, plan(meta, load_rules([rule])), source=source, config=meta.config)


def test_deepseek_gets_a_clear_error():
    hf = random_model(tiny_config("deepseek_v2_lite"))
    with pytest.raises(Exception, match="not a GQA attention module.*attention.mla"):
        meta = build_meta_model(tiny_config("deepseek_v2_lite"))
        apply(
            meta,
            plan(meta, load_rules(sparse_rules({}))),
            source=StateDictSource(hf.state_dict()),
            config=meta.config,
        )
