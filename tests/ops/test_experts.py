import pytest
import torch

from graftlm.ops import experts as experts_mod
from graftlm.ops.experts import ExpertsTorch
from tests.inject.helpers import meta_model, random_model, source_of, tiny_config

PATH = "model.layers.1.mlp.experts"


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "deepseek_v3"])
def pair(request):
    config = tiny_config(request.param)
    real = random_model(config).get_submodule(PATH)
    meta = meta_model(config).get_submodule(PATH)
    op = ExpertsTorch(PATH, source_of(real, PATH), config, meta)
    op.load()
    return real, op


def _routing(tokens, num_experts, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    return index, weights


def test_matches_hf_experts(pair):
    real, op = pair
    x = torch.randn(9, real.hidden_dim)
    index, weights = _routing(9, real.num_experts, 2)
    torch.testing.assert_close(op(x, index, weights), real(x, index, weights), rtol=1e-5, atol=1e-6)
    assert set(op.state_dict()) == {"gate_up_proj", "down_proj"}


def test_padding_index_is_skipped_like_hf(pair, monkeypatch):
    real, op = pair
    # HF's default grouped_mm path leaves sentinel rows undefined; its eager path skips them.
    monkeypatch.setattr(real.config, "_experts_implementation", "eager")
    x = torch.randn(4, real.hidden_dim)
    index, weights = _routing(4, real.num_experts, 2, seed=1)
    index[0, 1] = real.num_experts  # HF's "no expert" value
    index[3, 0] = real.num_experts
    torch.testing.assert_close(op(x, index, weights), real(x, index, weights), rtol=1e-5, atol=1e-6)


def test_one_matmul_pair_per_expert_hit(pair, monkeypatch):
    real, op = pair
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(experts_mod.F, "linear", lambda *a: calls.append(a[0].shape[0]) or linear(*a))
    tokens = 64
    index, weights = _routing(tokens, real.num_experts, 2, seed=2)
    index[:, 0] = 0  # expert 0 gets every token; the rest share the second slot
    index[:, 1] = torch.where(index[:, 1] == 0, 1, index[:, 1])
    op(torch.randn(tokens, real.hidden_dim), index, weights)
    hit = index.unique().numel()
    assert len(calls) == 2 * hit  # gate_up and down once per expert, not per token
    assert calls[0] == tokens  # expert 0's rows go through in one matmul
    assert sum(calls) == 2 * index.numel()


def test_grouped_experts_under_autograd_and_in_inference_mode():
    """The same outputs with and without the reused buffers (inference mode, no_grad), and gradients
    to x under autograd, where the buffers are not used."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=g)
    index, weights = _routing(6, 4, 2, seed=3)
    gate_up, down = torch.randn(4, 12, 8, generator=g), torch.randn(4, 8, 6, generator=g)
    act = torch.nn.functional.silu
    xg = x.clone().requires_grad_(True)
    want = experts_mod.grouped_experts(xg, index, weights, gate_up, down, act)
    want.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(experts_mod.grouped_experts(x, index, weights, gate_up, down, act), want.detach())
    with torch.inference_mode():
        got = experts_mod.grouped_experts(x, index, weights, gate_up, down, act)
        again = experts_mod.grouped_experts(x, index, weights, gate_up, down, act)  # the buffers reused
    assert torch.equal(got, want.detach()) and torch.equal(again, got)


@pytest.mark.parametrize(
    "act",
    [torch.nn.SiLU(), torch.nn.ReLU(inplace=True), torch.nn.Identity()],
    ids=["silu", "relu_", "identity"],
)
def test_gated_is_act_times_up_and_leaves_up_alone(act):
    from graftlm.ops.base import gated

    gate, up = torch.randn(5, 7), torch.randn(5, 7)
    want = act(gate.clone()) * up
    up_before = up.clone()
    with torch.no_grad():
        got = gated(act, gate, up)
    assert torch.equal(got, want) and torch.equal(up, up_before)
