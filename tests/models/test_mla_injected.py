"""Whole DeepSeek models with `attention.mla` injected (the built-in rules), against HF in fp32.

One sequence evaluated all at once, in prefill chunks through the engine's cache, and token by
token must give HF's logits (1e-4), and the engine's cache must hold only latent entries.
"""

from __future__ import annotations

import pytest
import torch

import graftlm
from graftlm.engine.cache import make_cache
from graftlm.engine.generate import Engine
from graftlm.engine.latent_cache import LatentLayer
from graftlm.inject import apply, load_rules, plan
from graftlm.models.build import build_meta_model
from graftlm.models.compat import library_cache_arg
from graftlm.ops.attention import MLAttention
from graftlm.weights.convert import convert
from graftlm.weights.memory import StateDictSource
from tests.engine.helpers import byte_tokenizer
from tests.inject.helpers import random_model, tiny_config
from tests.models.tiny import make_model

CACHE = library_cache_arg()  # the KV-cache argument: `cache` from transformers 5.24
ARCHS = ["deepseek_v2_lite", "deepseek_v2", "deepseek_v3"]
LATENT = 32 + 8  # the tiny configs' kv_lora_rank + qk_rope_head_dim


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _inject(name: str, hf, dtype=torch.float32, **overrides):
    meta = build_meta_model(tiny_config(name, **overrides))
    rules = load_rules("auto", arch=meta.config.model_type)
    p = plan(meta, rules, strict=True)
    return apply(meta, p, source=StateDictSource(hf.state_dict()), config=meta.config, dtype=dtype)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    torch.set_num_threads(1)
    hf = random_model(tiny_config(request.param))
    return request.param, hf, _inject(request.param, hf)


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_builtin_rules_inject_mla_everywhere(pair):
    _, hf, model = pair
    attns = [layer.self_attn for layer in model.model.layers]
    assert all(isinstance(a, MLAttention) for a in attns)
    assert [a.layer_idx for a in attns] == list(range(hf.config.num_hidden_layers))
    # the projections stay children at their HF paths, so the linear rule reached them
    assert attns[0].kv_a_proj_with_mqa.op_name.startswith("linear.")
    cache = make_cache(model)
    assert len(cache.layers) == hf.config.num_hidden_layers
    assert all(isinstance(layer, LatentLayer) and layer.width == LATENT for layer in cache.layers)


def test_logits_match_hf(pair):
    _, hf, model = pair
    ids = _ids(17, batch=2)
    with torch.inference_mode():
        ref = hf(ids).logits
        assert (model(ids).logits - ref).abs().max().item() <= 1e-4
        assert (model(ids, use_cache=False).logits - ref).abs().max().item() <= 1e-4


def test_chunks_and_token_by_token_match_all_at_once(pair):
    _, hf, model = pair
    ids = _ids(40, seed=1)
    cache = make_cache(model)
    bounds = [(0, 13), (13, 14), (14, 29)] + [(i, i + 1) for i in range(29, 40)]
    with torch.inference_mode():
        whole = model(ids).logits
        ref = hf(ids).logits
        pieces = [
            model(
                input_ids=ids[:, a:b],
                position_ids=torch.arange(a, b)[None],
                **{CACHE: cache},
                use_cache=True,
            ).logits
            for a, b in bounds
        ]
    got = torch.cat(pieces, dim=1)
    assert (got - whole).abs().max().item() <= 1e-4
    assert (got - ref).abs().max().item() <= 1e-4
    layer = cache.layers[0]
    assert layer.get_seq_length() == 40 and layer.entries().shape == (1, 40, LATENT)
    assert layer.bytes_per_token() == LATENT * 4  # fp32: 160 bytes per token per layer
    assert layer.grows == 1  # one allocation of `chunk` tokens, no copy per token


def test_engine_prefill_then_decode_matches_hf(pair):
    _, hf, model = pair
    engine = Engine(model, byte_tokenizer(), prefill_chunk=8)
    ids = _ids(30, seed=2)
    prompt = ids[0, :21].tolist()
    with torch.inference_mode():
        ref = hf(ids).logits[0]
        logits, cache = engine.prefill(prompt)
        steps = [logits[0]]
        for pos in range(21, 30):
            logits, cache = engine.forward(ids[:, pos : pos + 1], cache, start=pos)
            steps.append(logits[0])
    assert (torch.stack(steps) - ref[20:]).abs().max().item() <= 1e-4
    assert all(isinstance(layer, LatentLayer) for layer in cache.layers)


def test_long_prompt_through_the_engine():
    name = "deepseek_v2_lite"  # YaRN, no q_lora
    hf = random_model(tiny_config(name, max_position_embeddings=2048))
    model = _inject(name, hf, max_position_embeddings=2048)
    engine = Engine(model, byte_tokenizer(), prefill_chunk=256)
    ids = _ids(1003, seed=3)
    with torch.inference_mode():
        ref = hf(ids).logits[0, 999:]
        logits, cache = engine.prefill(ids[0, :1000].tolist())
        steps = [logits[0]]
        for pos in range(1000, 1003):
            logits, cache = engine.forward(ids[:, pos : pos + 1], cache, start=pos)
            steps.append(logits[0])
    assert (torch.stack(steps) - ref).abs().max().item() <= 1e-4
    layer = cache.layers[0]
    assert layer.get_seq_length() == 1003
    assert (layer.grows, layer.capacity) == (4, 1280)  # 256 -> 512 -> 768 -> 1280: chunks, then +50%


def test_bfloat16_model_close_to_hf():
    name = "deepseek_v2"
    hf = random_model(tiny_config(name))
    model = _inject(name, hf, dtype=torch.bfloat16)
    ids = _ids(12)
    cache = make_cache(model)
    with torch.inference_mode():
        ref = hf(ids).logits
        got = torch.cat(
            [
                model(input_ids=ids[:, a:b], position_ids=torch.arange(a, b)[None], **{CACHE: cache}).logits
                for a, b in [(0, 9), (9, 10), (10, 11), (11, 12)]
            ],
            dim=1,
        )
    assert cache.layers[0].buffer.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max().item() <= 0.1  # bf16 weights and cache: coarse, not wrong


@pytest.mark.parametrize("name", ["deepseek_v2_lite", "deepseek_v3"])
def test_gguf_file_with_auto_rules(tmp_path, name):
    hf = make_model(name, tmp_path)
    convert(tmp_path, tmp_path / "f32.gguf", "f32")
    llm = graftlm.load(tmp_path / "f32.gguf", rules="auto", progress=False)
    assert isinstance(llm.model.model.layers[0].self_attn, MLAttention)
    ids = _ids(20, seed=4)
    llm.engine.prefill_chunk = 6
    with torch.inference_mode():
        ref = hf(ids).logits[0]
        assert (llm.model(ids).logits[0] - ref).abs().max().item() <= 1e-4
        logits, cache = llm.engine.prefill(ids[0, :15].tolist())
        steps = [logits[0]]
        for pos in range(15, 20):
            logits, cache = llm.engine.forward(ids[:, pos : pos + 1], cache, start=pos)
            steps.append(logits[0])
    assert (torch.stack(steps) - ref[14:]).abs().max().item() <= 1e-4


def test_models_without_cache_owning_operators_keep_dynamic_cache():
    model = random_model(tiny_config("llama"))
    cache = make_cache(model)
    assert type(cache).__name__ == "DynamicCache"
    assert not any(isinstance(layer, LatentLayer) for layer in cache.layers)
