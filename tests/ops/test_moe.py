import pytest
import torch

from graftlm.ops.moe import MoEBlock
from tests.inject.helpers import random_model, tiny_config

PATH = "model.layers.1.mlp"

CASES = {
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),  # gated shared expert, no renormalisation
    "qwen2_moe_norm": ("qwen2_moe", {"norm_topk_prob": True}),
    "qwen3_moe": ("qwen3_moe", {}),  # renormalised
    "qwen3_moe_no_norm": ("qwen3_moe", {"norm_topk_prob": False}),
    "deepseek_v2_greedy": ("deepseek_v2_lite", {"routed_scaling_factor": 1.5}),
    "deepseek_v2_group_limited": ("deepseek_v2", {"routed_scaling_factor": 2.0}),
    "deepseek_v3": ("deepseek_v3", {}),
    "deepseek_v3_no_norm": ("deepseek_v3", {"norm_topk_prob": False}),
}


@pytest.fixture(scope="module", params=list(CASES))
def block(request):
    name, overrides = CASES[request.param]
    config = tiny_config(name, **overrides)
    hf = random_model(config).get_submodule(PATH)
    # Built on the real block, the operator adopts its (loaded) router, experts and shared experts.
    op = MoEBlock(PATH, None, config, hf)
    op.load()
    return hf, op


def test_moe_block_matches_hf(block):
    hf, op = block
    x = torch.randn(2, 7, op.config.hidden_size)
    torch.testing.assert_close(op(x), hf(x), rtol=1e-5, atol=1e-6)


def test_routing_hook_matches_hf_router(block):
    hf, op = block
    x = torch.randn(11, op.config.hidden_size)
    _, hf_weights, hf_index = hf.gate(x)
    weights, index = op.route(x)
    # Same experts with the same weights; the order within a token's top-k may differ (sorted=False).
    hf_index, order = hf_index.sort(dim=-1)
    index, mine = index.sort(dim=-1)
    assert torch.equal(index, hf_index)
    torch.testing.assert_close(weights.gather(1, mine), hf_weights.gather(1, order), rtol=1e-6, atol=1e-7)
    assert weights.dtype == hf_weights.dtype


def test_children_keep_hf_names(block):
    hf, op = block
    assert set(op.state_dict()) == set(hf.state_dict())


def test_unknown_architecture_needs_explicit_routing():
    config = tiny_config("mixtral")
    hf = random_model(config).get_submodule(PATH)
    config.model_type = "somethingnew"
    with pytest.raises(ValueError, match="no routing hook for model_type 'somethingnew'"):
        MoEBlock(PATH, None, config, hf)
    op = MoEBlock(PATH, None, config, hf, routing="mixtral")
    x = torch.randn(1, 3, config.hidden_size)
    torch.testing.assert_close(op(x), hf(x), rtol=1e-5, atol=1e-6)
