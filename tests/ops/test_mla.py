"""`attention.mla` against HF's DeepseekV2Attention / DeepseekV3Attention, one layer at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

from graftlm.engine.latent_cache import LatentLayer
from graftlm.inject.registry import PLANNED, get_operator, resolve_operator
from graftlm.models.compat import library_cache_arg
from graftlm.ops.attention import mla
from graftlm.ops.attention.mla import MLAttention, apply_rope, softmax_scale
from tests.inject.helpers import random_model, tiny_config

CACHE = library_cache_arg()  # the KV-cache argument: `cache` from transformers 5.24
PATH = "model.layers.1.self_attn"
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,  # != mscale: YaRN's attention factor on cos/sin is not 1
}
CASES = {
    "v2_lite_yarn_no_q_lora": ("deepseek_v2_lite", {}),
    "v2_q_lora": ("deepseek_v2", {}),
    "v2_yarn_mscale_ratio": ("deepseek_v2", {"rope_parameters": YARN}),
    "v3_interleave": ("deepseek_v3", {}),
    "v3_rotate_half_yarn": ("deepseek_v3", {"rope_interleave": False, "rope_parameters": YARN}),
}
FORMS = ("absorbed", "expanded")


def _layer(case: str, max_positions: int = 256, **op_kwargs):
    name, overrides = CASES[case]
    config = tiny_config(name, max_position_embeddings=max_positions, **overrides)
    model = random_model(config)
    hf = model.get_submodule(PATH)
    op = MLAttention(PATH, None, config, copy.deepcopy(hf), **op_kwargs)
    op.load()
    return model, hf, op


def _inputs(model, length: int, start: int = 0, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, model.config.hidden_size, generator=g)
    positions = torch.arange(start, start + length).unsqueeze(0).expand(batch, -1)
    return x, model.model.rotary_emb(x, positions)


def _hf(hf, x, pe, cache=None, mask=None):
    return hf(x, attention_mask=mask, **{CACHE: cache}, position_embeddings=pe)[0]


def _chunks(op, model, x, bounds, cache):
    outs = []
    for s0, s1 in bounds:
        pe = model.model.rotary_emb(x, torch.arange(s0, s1)[None])
        outs.append(op(x[:, s0:s1], position_embeddings=pe, **{CACHE: cache})[0])
    return torch.cat(outs, dim=1)


def _latent_cache(op) -> DynamicCache:
    cache = DynamicCache(config=op.config)
    cache.layers[op.layer_idx] = op.make_cache_layer()
    return cache


# -- the pieces --------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_softmax_scale_is_hfs_including_yarn_mscale(case):
    _, hf, op = _layer(case)
    assert op.scaling == pytest.approx(hf.scaling, rel=1e-12)
    if op.config.rope_parameters.get("mscale_all_dim"):
        assert op.scaling != pytest.approx((op.nope_dim + op.rope_dim) ** -0.5)  # the correction applied


def test_softmax_scale_mscale_all_dim_formula():
    config = tiny_config("deepseek_v2_lite")  # YaRN factor 4, mscale_all_dim 0.707
    mscale = 0.1 * 0.707 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert softmax_scale(config) == pytest.approx((16 + 8) ** -0.5 * mscale**2, rel=1e-6)
    config.rope_parameters = {**config.rope_parameters, "mscale_all_dim": 0}
    assert softmax_scale(config) == pytest.approx((16 + 8) ** -0.5)


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_matches_hf_v3(interleave):
    q, k = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    cos, sin = torch.cat([cos[..., :4]] * 2, -1), torch.cat([sin[..., :4]] * 2, -1)  # cat(freqs, freqs)
    fn = v3.apply_rotary_pos_emb_interleave if interleave else v3.apply_rotary_pos_emb
    want_q, want_k = fn(q.transpose(1, 2), k.unsqueeze(1), cos, sin)
    got_q, got_k = apply_rope(q, k, (cos, sin), interleave)
    torch.testing.assert_close(got_q, want_q.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(got_k, want_k[:, 0], rtol=0, atol=0)


def test_rope_matches_hf_v2_complex():
    q, k = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 8)
    freqs = torch.polar(torch.rand(2, 5, 4) + 0.5, torch.randn(2, 5, 4))
    want_q, want_k = v2.apply_rotary_emb(q.transpose(1, 2), k.unsqueeze(1), freqs)
    got_q, got_k = apply_rope(q, k, freqs, interleave=True)
    torch.testing.assert_close(got_q, want_q.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(got_k, want_k[:, 0], rtol=0, atol=0)


def test_absorbed_matrices_are_kv_b_proj_halves():
    _, hf, op = _layer("v2_q_lora")
    w = hf.kv_b_proj.weight.view(op.num_heads, op.nope_dim + op.v_dim, op.kv_lora_rank)
    torch.testing.assert_close(op.w_uk, w[:, : op.nope_dim], rtol=0, atol=0)
    torch.testing.assert_close(op.w_uv, w[:, op.nope_dim :], rtol=0, atol=0)
    assert op.w_uk.is_contiguous() and op.w_uv.is_contiguous()
    assert "w_uk" not in op.state_dict()  # derived, not a weight of the file
    assert set(op.state_dict()) == set(hf.state_dict())  # HF names kept


# -- whole sequences ---------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_matches_hf(case, form):
    model, hf, op = _layer(case, prefill=form)
    x, pe = _inputs(model, 13, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(op(x, position_embeddings=pe)[0], _hf(hf, x, pe), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", list(CASES))
def test_chunks_and_single_tokens_match_one_call(case, form):
    model, hf, op = _layer(case, prefill=form)
    x, pe = _inputs(model, 24)
    cache = _latent_cache(op)
    bounds = [(0, 9), (9, 10), (10, 17)] + [(i, i + 1) for i in range(17, 24)]
    with torch.no_grad():
        want = _hf(hf, x, pe)
        got = _chunks(op, model, x, bounds, cache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    layer = cache.layers[op.layer_idx]
    assert isinstance(layer, LatentLayer) and layer.get_seq_length() == 24


def test_cache_holds_hfs_latent_and_rotary_key_only():
    model, hf, op = _layer("v3_interleave")
    x, pe = _inputs(model, 10)
    hf_cache, ours = DynamicCache(config=model.config), _latent_cache(op)
    with torch.no_grad():
        _hf(hf, x, pe, cache=hf_cache)
        op(x, position_embeddings=pe, **{CACHE: ours})
    layer = ours.layers[op.layer_idx]
    entries = layer.entries()
    assert entries.shape == (1, 10, op.kv_lora_rank + op.rope_dim) == (1, 10, 40)
    hf_layer = hf_cache.layers[op.layer_idx]  # HF stores (normed latent, rotated rope key)
    torch.testing.assert_close(entries[..., : op.kv_lora_rank], hf_layer.keys[:, 0], rtol=0, atol=1e-7)
    torch.testing.assert_close(entries[..., op.kv_lora_rank :], hf_layer.values[:, 0], rtol=0, atol=1e-7)
    assert op.cache_values_per_token == 40 < op.expanded_values_per_token == 4 * (24 + 16)


@pytest.mark.parametrize("form", FORMS)
def test_long_prompt_then_decode_matches_hf(form, monkeypatch):
    """1,000 tokens of prefill in engine-sized chunks, then decode steps, against HF with its cache."""
    monkeypatch.setattr(mla, "BLOCK_ELEMENTS", 4 * 1000 * 37)  # absorbed prefill cut into query blocks
    model, hf, op = _layer("v2_lite_yarn_no_q_lora", max_positions=2048, prefill=form)
    prompt, steps = 1000, 3
    x, pe = _inputs(model, prompt + steps, seed=1)
    hf_cache, ours = DynamicCache(config=model.config), _latent_cache(op)
    decode = [(i, i + 1) for i in range(prompt, prompt + steps)]
    with torch.no_grad():  # HF: the prompt in one call (its SDPA path masks chunks wrongly), then decode
        want = torch.cat(
            [_hf(hf, x[:, a:b], pe[:, a:b], cache=hf_cache) for a, b in [(0, prompt), *decode]], 1
        )
        got = _chunks(op, model, x, [(s, min(s + 256, prompt)) for s in range(0, prompt, 256)] + decode, ours)
    torch.testing.assert_close(got[:, :prompt], want[:, :prompt], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, prompt:], want[:, prompt:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_causal_future_tokens_do_not_leak(form, monkeypatch):
    monkeypatch.setattr(mla, "BLOCK_ELEMENTS", 4 * 20 * 3)
    model, _, op = _layer("v2_q_lora", prefill=form)
    x, pe = _inputs(model, 20)
    y = x.clone()
    y[:, 12:] = torch.randn(1, 8, x.shape[-1]) * 10  # a different future
    with torch.no_grad():
        a = op(x, position_embeddings=pe)[0]
        b = op(y, position_embeddings=pe)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 0.1 * a.abs().max()  # the future did change


@pytest.mark.parametrize("form", FORMS)
def test_hf_padding_mask_is_honoured(form):
    model, hf, op = _layer("v2_q_lora", prefill=form)
    x, pe = _inputs(model, 9, batch=2)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9).clone()
    allowed[1, :, :, :3] = False  # sequence 1 is left-padded by 3
    allowed[1, :, :3, 0] = True  # padded queries still see something, as HF keeps them finite
    additive = torch.zeros(2, 1, 9, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        want = _hf(hf, x, pe, mask=allowed)
        for mask in (allowed, additive):
            torch.testing.assert_close(
                op(x, position_embeddings=pe, attention_mask=mask)[0], want, rtol=1e-5, atol=1e-6
            )


def test_decode_never_expands_the_cache(monkeypatch):
    model, hf, op = _layer("v2_lite_yarn_no_q_lora")
    x, pe = _inputs(model, 6)
    cache = _latent_cache(op)
    with torch.no_grad():
        _chunks(op, model, x, [(0, 5)], cache)

        def no_expansion(*args, **kwargs):
            raise AssertionError("kv_b_proj expanded the cache during decode")

        monkeypatch.setattr(op.kv_b_proj, "forward", no_expansion)
        got = _chunks(op, model, x, [(5, 6)], cache)
    torch.testing.assert_close(got, _hf(hf, x, pe)[:, 5:], rtol=1e-5, atol=1e-6)


def test_auto_picks_expanded_for_fresh_prompts_and_absorbed_after_context():
    config = tiny_config("deepseek_v2_lite", kv_lora_rank=512, qk_nope_head_dim=128, v_head_dim=128)
    with torch.device("meta"):
        hf = v2.DeepseekV2Attention(config, layer_idx=0)
    op = MLAttention(PATH, None, config, hf)
    assert op.absorb_up_to == 341  # 2 * 512 * 256 / (1024 - 256): DeepSeek's shapes
    assert op.use_absorbed(1, 0) and op.use_absorbed(1, 5000)  # decode
    assert not op.use_absorbed(512, 0) and not op.use_absorbed(16, 0)  # a fresh prompt
    assert op.use_absorbed(256, 2048) and not op.use_absorbed(512, 2048)  # measured crossover
    assert MLAttention(PATH, None, config, hf, prefill="absorbed").use_absorbed(512, 0)
    assert not MLAttention(PATH, None, config, hf, prefill="expanded").use_absorbed(2, 5000)


def test_bfloat16_close_to_hf_float32():
    model, hf, op = _layer("v2_q_lora", dtype="bfloat16")
    x, pe = _inputs(model, 12)
    cache = _latent_cache(op)
    with torch.no_grad():
        got = _chunks(op, model, x, [(0, 8)] + [(i, i + 1) for i in range(8, 12)], cache)
        want = _hf(hf, x, pe)
    assert got.dtype == torch.float32  # back in the input's dtype
    assert cache.layers[op.layer_idx].buffer.dtype == torch.bfloat16
    assert cache.layers[op.layer_idx].bytes_per_token() == 40 * 2
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
    assert (got - want).abs().max() > 0  # it did run in bf16


# -- contract and errors -----------------------------------------------------------------


def test_registered_and_ktransformers_alias_resolves():
    assert get_operator("attention.mla") is MLAttention
    assert "attention.mla" not in PLANNED
    resolved = resolve_operator(
        "ktransformers.operators.attention.KDeepseekV2Attention",
        {"generate_device": "cpu", "prefill_device": "cpu", "absorb_for_prefill": False},
    )
    assert resolved.cls is MLAttention and resolved.kwargs == {
        "generate_device": "cpu",
        "prefill_device": "cpu",
    }


def test_errors_name_the_module():
    config = tiny_config("deepseek_v2")
    with torch.device("meta"):
        hf = v2.DeepseekV2Attention(config, layer_idx=0)
    with pytest.raises(NotImplementedError, match=f"attention.mla at '{PATH}': prefill_device meta"):
        MLAttention(PATH, None, config, hf, prefill_device="meta")
    with pytest.raises(ValueError, match="prefill must be one of auto, absorbed, expanded"):
        MLAttention(PATH, None, config, hf, prefill="sometimes")
    model, _, op = _layer("v2_q_lora")
    x, pe = _inputs(model, 4)
    with pytest.raises(ValueError, match="needs position_embeddings"):
        op(x)
    with pytest.raises(ValueError, match=r"mask of shape \(1, 1, 4, 5\) does not fit 4 queries over 4"):
        op(x, position_embeddings=pe, attention_mask=torch.ones(1, 1, 4, 5, dtype=torch.bool))


def test_unload_then_load():
    _, _, op = _layer("v2_q_lora")
    op.unload()
    assert op.w_uk is None and op.w_uv is None
    op.load()
    assert op.w_uk.shape == (4, 16, 32) and op.w_uv.shape == (4, 16, 32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_matches_cpu(dtype):
    model, hf, op = _layer("v2_lite_yarn_no_q_lora", dtype=dtype)
    cuda = MLAttention(PATH, None, op.config, copy.deepcopy(hf).cuda(), generate_device="cuda", dtype=dtype)
    cuda.load()
    x, _ = _inputs(model, 40)
    outs = {}
    with torch.no_grad():
        for name, module in (("cpu", op), ("cuda", cuda)):
            cache, out = _latent_cache(module), []
            for a, b in [(0, 30)] + [(i, i + 1) for i in range(30, 40)]:
                pe = model.model.rotary_emb(x, torch.arange(a, b)[None])  # on the CPU; the operator moves it
                out.append(module(x[:, a:b].to(module.device), position_embeddings=pe, **{CACHE: cache})[0])
            outs[name] = torch.cat(out, dim=1)
    assert outs["cuda"].device.type == "cuda"
    tol = 1e-4 if dtype == "float32" else 5e-2
    torch.testing.assert_close(outs["cuda"].cpu(), outs["cpu"], rtol=tol, atol=tol)


# -- the latent cache layer --------------------------------------------------------------


def test_latent_layer_grows_in_chunks_not_per_token():
    layer = LatentLayer(6, 2, chunk=64)
    rows = torch.randn(1, 1000, 8)
    allocations = []
    for i in range(1000):
        out = layer.append(rows[:, i : i + 1])
        if layer.capacity not in allocations:
            allocations.append(layer.capacity)
    assert allocations == [64, 128, 192, 320, 512, 768, 1152]  # +chunk, then +50%, in whole chunks
    assert layer.grows == len(allocations)
    torch.testing.assert_close(out, rows, rtol=0, atol=0)
    assert out.data_ptr() == layer.buffer.data_ptr()  # a view of the buffer, not a copy
    assert layer.bytes_per_token() == 8 * 4


def test_latent_layer_speaks_transformers_cache_protocol():
    layer = LatentLayer(6, 2, chunk=16, max_tokens=20)
    latent, rope = torch.randn(2, 1, 5, 6), torch.randn(2, 1, 5, 2)
    keys, values = layer.update(latent, rope)
    assert keys.shape == (2, 1, 5, 6) and values.shape == (2, 1, 5, 2)
    torch.testing.assert_close(layer.entries(), torch.cat([latent[:, 0], rope[:, 0]], -1), rtol=0, atol=0)
    assert layer.get_mask_sizes(3) == (8, 0) and layer.get_seq_length() == 5
    layer.update(torch.randn(2, 1, 12, 6), torch.randn(2, 1, 12, 2))
    assert layer.capacity == 20  # the context caps a growth step
    layer.crop(-7)
    assert layer.get_seq_length() == 10 and layer.keys.shape == (2, 1, 10, 6)
    torch.testing.assert_close(layer.keys[:, :, :5], latent, rtol=0, atol=0)
    layer.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(layer.values[:, :, :5], rope[1:], rtol=0, atol=0)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.capacity == 20  # the buffer is kept for reuse
    with pytest.raises(ValueError, match="negative count"):
        layer.crop(3)
    with pytest.raises(ValueError, match="stores 8 values per token, got 9"):
        layer.append(torch.randn(1, 1, 9))
    with pytest.raises(ValueError, match="holds batch 1, got a write of batch 3"):
        layer.append(torch.randn(3, 1, 8))


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_decode_on_the_files_k_b_and_v_b_blocks(qtype, tmp_path):
    """One-token steps run W_UK and W_UV on attn_k_b / attn_v_b's quantized blocks (one C call over
    the heads each); the result matches the fp32 matrices within the int8 activation rounding."""
    import graftlm
    from graftlm.kernels.cpu import qblocks
    from graftlm.weights.convert import convert
    from tests.models.tiny import make_tokenizer

    if not qblocks.available():
        pytest.skip("graftlm._qkernels is not built")
    # widths the 32-value block types divide: nope 32 (attn_k_b's rows), rank 64 (attn_v_b's rows)
    config = tiny_config("deepseek_v2_lite", qk_nope_head_dim=32, kv_lora_rank=64, v_head_dim=32)
    folder = tmp_path / "hf"
    random_model(config).save_pretrained(folder)
    make_tokenizer(folder)
    llm = graftlm.load(convert(folder, tmp_path / "m.gguf", qtype), rules="auto", progress=False)
    ops = [m for m in llm.model.modules() if isinstance(m, MLAttention)]
    assert ops and all(op.heads_q is not None for op in ops)
    assert {op.heads_q[0][0].name for op in ops} == {qtype.upper()}
    op = ops[1]
    g = torch.Generator().manual_seed(0)
    heads, r = op.num_heads, op.kv_lora_rank
    q_nope = torch.randn(1, 1, heads, op.nope_dim, generator=g)
    q_rope = torch.randn(1, 1, heads, op.rope_dim, generator=g)
    kv = torch.randn(1, 20, r + op.rope_dim, generator=g)
    fast = op._absorbed(q_nope, q_rope, kv, None, 19)
    saved, op.heads_q = op.heads_q, None
    try:
        exact = op._absorbed(q_nope, q_rope, kv, None, 19)
    finally:
        op.heads_q = saved
    assert fast.shape == exact.shape == (1, 1, heads, op.v_dim)
    # int8 activations per block of 32: ~0.4% of each block's largest value, twice over
    torch.testing.assert_close(fast, exact, rtol=0.05, atol=0.05 * exact.abs().max().item())
    # a whole decode step through the model: the same next-token logits, up to that rounding
    engine, ids = llm.engine, torch.randint(0, config.vocab_size, (12,), generator=g).tolist()

    def step_logits() -> torch.Tensor:
        _, cache = engine.prefill(ids)
        return engine.forward(torch.tensor([[ids[-1]]]), cache, len(ids))[0].reshape(-1)

    fast = step_logits()
    saved = [op.heads_q for op in ops]
    for op in ops:
        op.heads_q = None
    exact = step_logits()
    for op, h in zip(ops, saved):
        op.heads_q = h
    torch.testing.assert_close(fast, exact, rtol=0.05, atol=0.05 * exact.abs().max().item())


@pytest.mark.parametrize("total", [1, 7, 300])
def test_one_query_attention_is_absorbed_attention(total):
    """The decode step's loop-free form gives absorbed_attention's values, bit for bit."""
    g = torch.Generator().manual_seed(total)
    q = torch.randn(16, 576, generator=g) * 0.1
    kv = torch.randn(total, 576, generator=g)
    want = mla.absorbed_attention(q.view(1, 1, 16, 576), kv[None], 512, None, None)[0, 0]
    assert torch.equal(mla.one_query_attention(q, kv, 512), want)


@pytest.mark.parametrize(
    "case", ["v2_lite_yarn_no_q_lora", "v2_q_lora", "v3_interleave", "v3_rotate_half_yarn"]
)
def test_one_token_step_is_the_absorbed_path(case, tmp_path, monkeypatch):
    """A decode step's direct C sequence (`_step`: query with or without q_lora, both RMSNorms, the
    three rope forms, the latent cache append, W_UK, attend, W_UV, o_proj) gives the output the
    modules' absorbed path gives on the same cache, layer by layer over several decode steps."""
    import graftlm
    from graftlm.kernels.cpu import qblocks
    from graftlm.weights.convert import convert
    from tests.models.tiny import make_tokenizer

    if not qblocks.available():
        pytest.skip("graftlm._qkernels is not built")
    name, overrides = CASES[case]
    # widths the 32-value blocks divide (q_lora_rank is q_b_proj's row width)
    widths = dict(qk_nope_head_dim=32, kv_lora_rank=64, v_head_dim=32)
    if name != "deepseek_v2_lite":
        widths["q_lora_rank"] = 32
    config = tiny_config(name, **widths, **overrides)
    folder = tmp_path / "hf"
    random_model(config).save_pretrained(folder)
    make_tokenizer(folder)
    llm = graftlm.load(convert(folder, tmp_path / "m.gguf", "q8_0"), rules="auto", progress=False)
    real, compared = MLAttention._step, []

    def both(self, x, position_embeddings, mask, cache):
        ahead = copy.deepcopy(cache)
        y = real(self, x, position_embeddings, mask, cache)
        assert y is not None, f"{self.key}: the one-token step did not apply"
        monkeypatch.setattr(MLAttention, "_step", lambda *args: None)
        want, _ = self(x, position_embeddings=position_embeddings, attention_mask=mask, **{CACHE: ahead})
        monkeypatch.setattr(MLAttention, "_step", both)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(
            cache.layers[self.layer_idx].entries(), ahead.layers[self.layer_idx].entries()
        )
        compared.append(self.layer_idx)
        return y

    monkeypatch.setattr(MLAttention, "_step", both)
    ids = torch.randint(0, config.vocab_size, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    _, cache = llm.engine.prefill(ids)
    for t in range(4):
        _, cache = llm.engine.forward(torch.tensor([[ids[t]]]), cache, len(ids) + t)
    assert len(compared) == 4 * config.num_hidden_layers
