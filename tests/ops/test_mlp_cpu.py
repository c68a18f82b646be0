"""`mlp.cpu` against the transformers MLP modules it replaces, and its refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graftlm
from graftlm.kernels.cpu import qblocks
from graftlm.ops.attention.gqa import GQAttention
from graftlm.ops.attention.mla import MLAttention
from graftlm.ops.linear_cpu import LinearCPU, fused_linears
from graftlm.ops.mlp_cpu import MLPCPU
from graftlm.weights.convert import convert
from tests.models.tiny import VOCAB, make_model


@pytest.fixture(scope="module", params=["gemma3", "qwen2_moe", "deepseek_v2_lite"])
def model_files(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    make_model(request.param, folder)
    return request.param, {t: convert(folder, folder / f"{t}.gguf", t) for t in ("f32", "q8_0")}


def test_auto_rules_place_it_and_logits_follow_hf(model_files):
    """f32 weights: mlp.cpu (dense MLPs, shared experts) computes what transformers' modules do."""
    arch, files = model_files
    plain = graftlm.load(files["f32"], progress=False)
    fast = graftlm.load(files["f32"], rules="auto", progress=False)
    mlps = [m for m in fast.model.modules() if isinstance(m, MLPCPU)]
    assert mlps, arch
    assert not any(type(m).__name__.endswith("MLP") for m in fast.model.modules())
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        torch.testing.assert_close(fast.model(ids).logits, plain.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_one_call_equals_the_projections_one_by_one(model_files):
    """On GGUF blocks, gate and up (and attention's q, k, v) in one matmul_many call give exactly
    what each linear.cpu gives alone, biases included (Qwen2-MoE's q/k/v)."""
    if not qblocks.available():
        pytest.skip("graftlm._qkernels is not built")
    arch, files = model_files
    fast = graftlm.load(files["q8_0"], rules="auto", progress=False)
    groups = [[m.gate_proj, m.up_proj] for m in fast.model.modules() if isinstance(m, MLPCPU)]
    groups += [[m.q_proj, m.k_proj, m.v_proj] for m in fast.model.modules() if isinstance(m, GQAttention)]
    groups += [  # MLA: the query's first projection and kv_a_proj_with_mqa
        [m._modules["q_a_proj" if m.q_lora_rank else "q_proj"], m.kv_a_proj_with_mqa]
        for m in fast.model.modules()
        if isinstance(m, MLAttention)
    ]
    assert groups
    g = torch.Generator().manual_seed(5)
    for linears in groups:
        assert all(isinstance(lin, LinearCPU) and lin.packed.layout == "gguf" for lin in linears)
        for shape in [(1, 1, linears[0].in_features), (2, 2, linears[0].in_features)]:  # <= kernel_rows
            x = torch.randn(*shape, generator=g)
            with torch.inference_mode():
                together = fused_linears(linears, x)
                alone = [lin(x) for lin in linears]
            assert together is not None
            for a, b in zip(together, alone):
                assert torch.equal(a, b)
    with torch.inference_mode():  # prefill-sized and bf16 inputs take the modules one by one
        lin = groups[0]
        assert (
            fused_linears(lin, torch.randn(1, 64, lin[0].in_features)) is None
            or lin[0].packed.kernel_rows >= 64
        )
        assert fused_linears(lin, torch.randn(1, 1, lin[0].in_features, dtype=torch.bfloat16)) is None


def test_refuses_other_classes():
    class FusedGateUp(nn.Module):  # Phi-3's form: one gate_up_proj
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Linear(4, 8)
            self.down_proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"mlp\.cpu at 'm'.*not FusedGateUp"):
        MLPCPU("m", None, None, FusedGateUp())


def test_mla_decode_with_one_call_equals_separate_calls(model_files):
    """DeepSeek: a decode step with q_proj and kv_a_proj_with_mqa in one call gives the same logits,
    bit for bit, as with the two calls apart."""
    arch, files = model_files
    if arch != "deepseek_v2_lite" or not qblocks.available():
        pytest.skip("MLA on GGUF blocks")
    import graftlm.ops.attention.mla as mla

    fast = graftlm.load(files["q8_0"], rules="auto", progress=False)
    ids = torch.randint(3, VOCAB, (9,), generator=torch.Generator().manual_seed(7)).tolist()

    def step() -> torch.Tensor:
        _, cache = fast.engine.prefill(ids)
        return fast.engine.forward(torch.tensor([[ids[-1]]]), cache, len(ids))[0]

    together = step()
    real = mla.fused_linears
    mla.fused_linears = lambda linears, x: None
    try:
        apart = step()
    finally:
        mla.fused_linears = real
    assert torch.equal(together, apart)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
@pytest.mark.parametrize("name, kind", [("silu", 0), ("gelu_pytorch_tanh", 1), ("gelu_new", 1)])
def test_act_mul_is_the_activation_times_up(isa, name, kind):
    """`act_mul` (the one-token MLP's activation times up, in place) against the float64 function:
    within 2e-6 of the result itself (torch's fp32 GELU is ~1e-5 off for x < -2), across the exp's
    clamped range, with a length that leaves a tail after the 8-wide vectors; where e^-x overflows
    (x far below zero, and infinities and NaN) the values torch gives."""
    from transformers.activations import ACT2FN

    from graftlm.ops.mlp_cpu import act_kind

    if not qblocks.available():
        pytest.skip("graftlm._qkernels is not built")
    assert act_kind(ACT2FN[name]) == kind
    kernels = qblocks._qkernels
    previous = kernels.isa()
    kernels.set_isa(isa)
    try:
        g = torch.Generator().manual_seed(7)
        x, y = torch.randn(4099, generator=g) * 4, torch.randn(4099, generator=g)
        x[:8] = torch.tensor([-200.0, 200.0, 0.0, -90.0, 90.0, 1e-8, -3.0002, -4.9998])
        xd = x.double()  # the exact function: x sigmoid(x), or x sigmoid(2u) (= x (1 + tanh(u)) / 2)
        z = xd if kind == 0 else 2 * 0.7978845608028654 * (xd + 0.044715 * xd**3)
        want = xd * torch.sigmoid(z) * y.double()
        got = x.clone()
        kernels.act_mul(got.data_ptr(), y.data_ptr(), got.numel(), kind)
        assert torch.isfinite(got).all()
        # AVX2 computes that form (for the GELU, u's own fp32 rounding, ~1e-7 |2u|, moves e^-2u by as
        # much: 1e-5 relative at x ~ -8); the portable path (and torch) computes 1 + tanh(u), which
        # cancels for negative u: an absolute error of about an ulp of 1 times |x| / 2
        rtol = 2e-6 if kind == 0 else 1e-5
        slack = 1e-36 if isa == "avx2" or kind == 0 else 2e-7 * (xd * y.double()).abs()
        assert ((got.double() - want).abs() <= rtol * want.abs() + slack).all()
        inf = float("inf")
        special = torch.tensor([-3e38, -1e10, -88.5, -100.0, inf, -inf, float("nan"), 1e38, 3.0] * 2)
        ones = torch.ones_like(special)
        got = special.clone()
        kernels.act_mul(got.data_ptr(), ones.data_ptr(), got.numel(), kind)
        want = ACT2FN[name](special)
        assert torch.equal(got.isnan(), want.isnan()), (got, want)
        finite = ~want.isnan()
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-36)  # e^88.5 < fp32 max
    finally:
        kernels.set_isa(previous)
    assert act_kind(nn.ReLU()) is None and act_kind(nn.GELU()) is None and act_kind(nn.GELU("tanh")) == 1
