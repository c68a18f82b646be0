"""`decoder.cpu`: its one-token path against the modules' path it shortcuts, and its C seams against
the torch operations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import graftlm
from graftlm.kernels.cpu import fused, qblocks
from graftlm.models.compat import library_cache_arg
from graftlm.ops.attention.gqa import GQAttention
from graftlm.ops.decoder_cpu import DecoderCPU
from graftlm.ops.linear_cpu import runs_direct
from graftlm.ops.mlp_cpu import MLPCPU
from graftlm.weights.convert import convert
from tests.inject.helpers import random_model, tiny_config
from tests.models.tiny import VOCAB, make_model

CACHE = library_cache_arg()
needs_kernels = pytest.mark.skipif(not qblocks.available(), reason="the C extension is not built")


def _set_path(kernels, isa: str) -> None:
    """avx512: the AVX2 path with its AVX-512 kernels (512-bit attention where the width allows);
    avx2: without them; portable. Skips where the CPU has no such path."""
    vnni = kernels.set_vnni(isa == "avx512")
    got = kernels.set_isa("portable" if isa == "portable" else "avx2")
    if got != ("portable" if isa == "portable" else "avx2") or (isa == "avx512" and not vnni):
        kernels.set_vnni(True)
        pytest.skip(f"this CPU has no {isa} path")


@needs_kernels
@pytest.mark.parametrize("post", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_add_rmsnorm_is_the_torch_seam_bit_for_bit(post, norm):
    g = torch.Generator().manual_seed(0)
    rows, dim, eps = 3, 640, 1e-6
    res, x = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g) * 5
    post_w, w = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    want_sum = res + (fused.rmsnorm(x, post_w, eps) if post else x)
    got_sum, got_norm = torch.empty(rows, dim), torch.full((rows, dim), 7.0)
    qblocks._qkernels.add_rmsnorm(
        res.data_ptr(),
        x.data_ptr(),
        rows,
        dim,
        got_sum.data_ptr(),
        post_w.data_ptr() if post else 0,
        w.data_ptr() if norm else 0,
        eps,
        got_norm.data_ptr() if norm else 0,
    )
    assert torch.equal(got_sum, want_sum)
    assert torch.equal(got_norm, fused.rmsnorm(want_sum, w, eps) if norm else torch.full((rows, dim), 7.0))
    inplace = res.clone()  # the sum may overwrite the residual
    qblocks._qkernels.add_rmsnorm(
        inplace.data_ptr(),
        x.data_ptr(),
        rows,
        dim,
        inplace.data_ptr(),
        post_w.data_ptr() if post else 0,
        0,
        eps,
        0,
    )
    assert torch.equal(inplace, want_sum)


@needs_kernels
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize(
    "heads, kv_heads, dim, length, capacity",
    [
        (4, 1, 256, 100, 300),
        (4, 1, 256, 400, 400),  # parallel: on AVX2 the keys split between threads, else the group
        (3, 1, 64, 2000, 2000),  # parallel: keys in parts (AVX2), else the group in parts of two and one
        (4, 2, 128, 1001, 1001),  # parallel: with 4 threads each KV head's keys in two parts
        (16, 4, 128, 7, 7),
        (8, 8, 64, 1, 4),
        (32, 8, 128, 1500, 1600),  # parallel over KV heads
        (6, 2, 40, 33, 40),
        (70, 1, 36, 45, 45),  # a group of more than 64 heads; a width not a multiple of 8
        (5, 1, 24, 130, 131),  # three spans of keys; 16 + 8 value columns
    ],
)
def test_attend_matches_sdpa(isa, heads, kv_heads, dim, length, capacity):
    """One query over K/V views of a larger cache buffer, as the KV cache hands them out; with the
    work above the kernel's threshold the KV heads (or parts of one's query heads) run in parallel."""
    kernels = qblocks._qkernels
    previous = kernels.isa()
    _set_path(kernels, isa)
    try:
        g = torch.Generator().manual_seed(1)
        kbuf, vbuf = (torch.randn(1, kv_heads, capacity, dim, generator=g) for _ in range(2))
        k, v = kbuf[:, :, :length], vbuf[:, :, :length]
        q = torch.randn(1, heads, 1, dim, generator=g) * 2
        want = F.scaled_dot_product_attention(q, k, v, scale=dim**-0.5, enable_gqa=True).view(heads, dim)
        for threads in (1, 2, 3, 4):
            out = torch.empty(heads, dim)
            kernels.attend(
                q.data_ptr(), heads, kv_heads, dim, k.data_ptr(), v.data_ptr(), length, k.stride(1), dim**-0.5,
                out.data_ptr(), threads,
            )  # fmt: skip
            torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)
    finally:
        kernels.set_isa(previous)
        kernels.set_vnni(True)


@needs_kernels
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_attend_keeps_an_infinite_score_a_nan_as_sdpa_does(isa):
    """A key with an infinite score makes its heads' outputs NaN in SDPA; so with any thread count
    (the key split must not drop the part whose softmax total is 0)."""
    kernels = qblocks._qkernels
    previous = kernels.isa()
    _set_path(kernels, isa)
    try:
        g = torch.Generator().manual_seed(5)
        heads, dim, length = 4, 64, 1024
        k, v = torch.randn(1, 1, length, dim, generator=g), torch.randn(1, 1, length, dim, generator=g)
        q = torch.randn(1, heads, 1, dim, generator=g)
        k[0, 0, 700, 0] = float("inf")
        want = F.scaled_dot_product_attention(q, k, v, scale=dim**-0.5, enable_gqa=True).view(heads, dim)
        assert want.isnan().any() and not want.isnan().all()  # the heads whose q[0] is positive
        for threads in (1, 2, 4):
            out = torch.empty(heads, dim)
            kernels.attend(
                q.data_ptr(), heads, 1, dim, k.data_ptr(), v.data_ptr(), length, k.stride(1), dim**-0.5,
                out.data_ptr(), threads,
            )  # fmt: skip
            assert torch.equal(out.isnan().all(-1), want.isnan().all(-1)), threads
    finally:
        kernels.set_isa(previous)
        kernels.set_vnni(True)


@needs_kernels
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("length, at", [(8, 3), (9, 8), (70, 17), (70, 66)])
def test_attend_keeps_a_nan_key_a_nan_as_sdpa_does(isa, length, at):
    """A NaN in a key makes every head's output NaN in SDPA, wherever the key sits: in the vectorized
    softmax's blocks of eight as much as in its tail."""
    kernels = qblocks._qkernels
    previous = kernels.isa()
    _set_path(kernels, isa)
    try:
        g = torch.Generator().manual_seed(6)
        heads, dim = 4, 64
        k, v = torch.randn(1, 1, length, dim, generator=g), torch.randn(1, 1, length, dim, generator=g)
        q = torch.randn(1, heads, 1, dim, generator=g)
        k[0, 0, at, 5] = float("nan")
        want = F.scaled_dot_product_attention(q, k, v, scale=dim**-0.5, enable_gqa=True).view(heads, dim)
        assert want.isnan().all()
        for threads in (1, 2):
            out = torch.empty(heads, dim)
            kernels.attend(
                q.data_ptr(), heads, 1, dim, k.data_ptr(), v.data_ptr(), length, k.stride(1), dim**-0.5,
                out.data_ptr(), threads,
            )  # fmt: skip
            assert out.isnan().all(), (threads, out.isnan().sum())
    finally:
        kernels.set_isa(previous)
        kernels.set_vnni(True)


@needs_kernels
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize(
    "heads, width, vdim, length",
    [(16, 576, 512, 300), (16, 576, 512, 2049), (3, 36, 20, 7), (4, 64, 64, 1), (5, 48, 40, 70)],
)
def test_attend_over_latent_rows(isa, heads, width, vdim, length):
    """MLA's form: one KV head whose rows are `width` apart, keys the whole row, values its first
    `vdim` values (softmax(q K^T) K[:, :vdim], as one_query_attention computes it)."""
    kernels = qblocks._qkernels
    previous = kernels.isa()
    _set_path(kernels, isa)
    try:
        g = torch.Generator().manual_seed(2)
        q, keys = torch.randn(heads, width, generator=g) * 0.2, torch.randn(length, width, generator=g)
        qd, kd = q.double(), keys.double()
        want = (torch.softmax(qd @ kd.T, dim=-1) @ kd[:, :vdim]).float()
        for threads in (1, 2, 3):
            out = torch.empty(heads, vdim)
            kernels.attend(
                q.data_ptr(), heads, 1, width, keys.data_ptr(), keys.data_ptr(), length, keys.numel(), 1.0,
                out.data_ptr(), threads, width, vdim,
            )  # fmt: skip
            # fp32 sums of up to 576 products against a float64 reference: float rounding
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    finally:
        kernels.set_isa(previous)
        kernels.set_vnni(True)


@needs_kernels
def test_attend_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        qblocks._qkernels.attend(0, 3, 2, 16, 0, 0, 4, 64, 1.0, 0, 1)
    with pytest.raises(ValueError, match="head_stride"):
        qblocks._qkernels.attend(0, 2, 2, 16, 0, 0, 4, 32, 1.0, 0, 1)


ARCHS = ["llama", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma3", "deepseek_v2_lite"]


def _decode(llm, ids: list[int], steps: list[int]) -> torch.Tensor:
    """Logits after the prompt and after each of `steps` fed one at a time (teacher-forced, so a
    near tie cannot send the two sides down different tokens)."""
    logits, cache = llm.engine.prefill(ids)
    out = [logits]
    for t, token in enumerate(steps):
        logits, cache = llm.engine.forward(torch.tensor([[token]]), cache, len(ids) + t)
        out.append(logits)
    return torch.stack(out)


def _three_ways(arch, tmp_path, **overrides):
    """The same Q8_0 file loaded three times: decoder.cpu's fused path with the attention and MLP
    programs inside it; transformers' layer order with each operator running its own program; every
    operator's general path (projections through fused_linears, SDPA)."""
    folder = tmp_path / arch
    make_model(arch, folder, **overrides)
    path = convert(folder, tmp_path / "q8_0.gguf", "q8_0")
    layers, programs, general = (graftlm.load(path, rules="auto", progress=False) for _ in range(3))
    for llm in (programs, general):
        decoders = [m for m in llm.model.modules() if isinstance(m, DecoderCPU)]
        assert len(decoders) == llm.model.config.num_hidden_layers
        for layer in decoders:
            layer._plan = False  # the modules, in transformers' order
    for m in general.model.modules():
        if isinstance(m, (GQAttention, MLPCPU)):
            m._program = False
    return layers, programs, general


IDS = torch.randint(3, VOCAB, (10,), generator=torch.Generator().manual_seed(3)).tolist()
STEPS = torch.randint(3, VOCAB, (30,), generator=torch.Generator().manual_seed(4)).tolist()


@needs_kernels
@pytest.mark.parametrize("arch", ARCHS)
def test_one_token_programs_are_the_general_path_bit_for_bit(arch, tmp_path, monkeypatch):
    """Prefill, then 30 one-token steps through the engine (past Gemma 3's sliding window of 8): with
    the attention done by SDPA, the fused layer and the per-operator programs give the general
    path's logits exactly (the same kernels and operations, in the same order)."""
    monkeypatch.setattr(fused, "C_ATTENTION", False)
    monkeypatch.setattr(fused, "C_ACTIVATION", False)
    layers, programs, general = _three_ways(arch, tmp_path)
    want = _decode(general, IDS, STEPS)
    for llm in (layers, programs):
        assert torch.equal(_decode(llm, IDS, STEPS), want)
    # the fused path ran, with the programs of the operators that have one
    for layer in (m for m in layers.model.modules() if isinstance(m, DecoderCPU)):
        assert layer._plan
        is_gqa = isinstance(layer.self_attn, GQAttention)  # MLA and MoE blocks run as modules
        assert is_gqa != arch.startswith("deepseek")
        assert (layer._plan.attn is not None) == is_gqa
        assert (layer._plan.mlp is not None) == isinstance(layer.mlp, MLPCPU)
    for m in (m for m in programs.model.modules() if isinstance(m, MLPCPU)):  # each ran its own
        direct = runs_direct([m.gate_proj, m.up_proj], m.gate_proj.in_features) and runs_direct(
            [m.down_proj], m.down_proj.in_features
        )  # (not the tiny Qwen2-MoE's shared expert: its width 48 is no multiple of Q8_0's 32)
        assert bool(m._program) == direct


@needs_kernels
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "deepseek_v2_lite", "deepseek_v3"])
def test_one_token_attention_in_c(arch, tmp_path, monkeypatch):
    """With `attend` (SDPA's, or for MLA torch's two GEMMs', result up to float rounding), the logits
    stay within what that rounding can move through int8-quantized activations (a flipped rounding
    step: ~1e-3)."""
    layers, programs, general = _three_ways(arch, tmp_path)
    got = [_decode(llm, IDS, STEPS) for llm in (layers, programs)]
    monkeypatch.setattr(fused, "C_ATTENTION", False)
    monkeypatch.setattr(fused, "C_ACTIVATION", False)
    want = _decode(general, IDS, STEPS)
    for logits in got:
        torch.testing.assert_close(logits, want, rtol=1e-3, atol=5e-3)


@needs_kernels
def test_one_kv_head_with_strided_cache_views_falls_back_to_sdpa(tmp_path):
    """A cache may hand back keys as views of a [B, T, H, D] tensor: with one KV head they pass the
    row checks, but the heads are not apart; the program must use SDPA, not fail after the update."""

    class TokenMajorCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)

            def token_major(x):
                return (
                    torch.empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3])
                    .copy_(x.transpose(1, 2))
                    .transpose(1, 2)
                )

            return token_major(keys), token_major(values)

    layers, _, general = _three_ways("llama", tmp_path, num_key_value_heads=1)
    outs = []
    for llm in (layers, general):
        cache = TokenMajorCache(config=llm.model.config)
        with torch.no_grad():
            llm.model(torch.tensor([[5, 6, 7]]), **{CACHE: cache}, use_cache=True)
            outs.append(llm.model(torch.tensor([[8]]), **{CACHE: cache}, use_cache=True).logits)
        assert cache.get_seq_length() == 4
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@needs_kernels
def test_one_token_path_under_another_default_dtype(tmp_path):
    """The kernels write fp32: scratch buffers are fp32 whatever torch's default dtype is."""
    layers, _, general = _three_ways("gemma3", tmp_path)
    want = _decode(general, IDS, STEPS[:5])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = _decode(layers, IDS, STEPS[:5])
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=5e-3)


def test_refuses_other_decoder_classes():
    config = tiny_config("gemma3")
    layer = random_model(config).model.layers[0]
    with pytest.raises(ValueError, match=r"decoder\.cpu at 'a'.*not Gemma3MLP"):
        DecoderCPU("a", None, config, layer.mlp)
    op = DecoderCPU("model.layers.0", None, config, layer)
    assert op.sandwich and op.layer_idx == 0
    assert set(op._modules) == {
        "self_attn",
        "mlp",
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    }


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_output_hidden_states_are_recorded_through_the_operators(arch, tmp_path):
    """transformers records hidden states with hooks on its decoder-layer class; the operators that
    stand for it are added to that recording, so the states match the plain model's."""
    make_model(arch, tmp_path / arch)
    path = convert(tmp_path / arch, tmp_path / "f32.gguf", "f32")
    ids = torch.tensor([[5, 6, 7, 8]])
    fast = graftlm.load(path, rules="auto", progress=False)
    plain = graftlm.load(path, progress=False)  # built after: resets transformers' registry entry
    assert any(isinstance(m, DecoderCPU) for m in fast.model.modules())
    states = []
    for llm in (plain, fast):
        with torch.no_grad():
            states.append(llm.model(ids, output_hidden_states=True).hidden_states)
    assert len(states[1]) == len(states[0]) == fast.model.config.num_hidden_layers + 1
    for want, got in zip(*states):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_programs_take_a_strided_token(tmp_path):
    """A one-token input that is a strided view runs the programs on a contiguous copy it keeps
    alive: the same outputs as for the contiguous row."""
    _, programs, _ = _three_ways("qwen3", tmp_path)
    layer = programs.model.model.layers[0]
    hidden = programs.model.config.hidden_size
    wide = torch.randn(1, 1, 2 * hidden, generator=torch.Generator().manual_seed(5))
    strided, row = wide[..., ::2], wide[..., ::2].contiguous()
    assert not strided.is_contiguous()
    rope = programs.model.model.rotary_emb(row, torch.tensor([[3]]))
    with torch.no_grad():
        assert torch.equal(layer.mlp(strided), layer.mlp(row))
        got = layer.self_attn(strided, position_embeddings=rope, attention_mask=None)[0]
        assert torch.equal(got, layer.self_attn(row, position_embeddings=rope, attention_mask=None)[0])
    assert layer.mlp._program and layer.self_attn._program  # the programs ran
