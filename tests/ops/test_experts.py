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
