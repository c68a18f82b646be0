"""Device kwargs of every operator: inputs move to generate_device at the operator's boundary, outputs
go to out_device (or back where the input came from) in the input's dtype.

Without a GPU the moves are observed with the meta device as `out_device`: an output lands there
only if the operator honoured it. The CUDA test runs each operator on the GPU from CPU inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from graftlm.ops.attention.mla import MLAttention
from graftlm.ops.experts import ExpertsTorch
from graftlm.ops.experts_cpu import ExpertsCPU
from graftlm.ops.linear import LinearTorch
from graftlm.ops.linear_cpu import LinearCPU
from graftlm.ops.moe import MoEBlock
from graftlm.ops.rope import RotaryEmbedding
from tests.inject.helpers import random_model, source_of, tiny_config

MOE = "model.layers.1.mlp"


@pytest.fixture(scope="module")
def qwen():
    config = tiny_config("qwen2_moe")
    return config, random_model(config)


def _linear(cls, qwen, **kwargs):
    config, model = qwen
    path = "model.layers.0.self_attn.q_proj"
    real = model.get_submodule(path)
    op = cls(path, source_of(real, path), config, real, **kwargs)
    op.load()
    return real, op


def _experts(cls, qwen, **kwargs):
    config, model = qwen
    real = model.get_submodule(f"{MOE}.experts")
    op = cls(f"{MOE}.experts", source_of(real, f"{MOE}.experts"), config, real, **kwargs)
    op.load()
    x = torch.randn(5, config.hidden_size)
    weights, index = torch.rand(5, 2), torch.stack([torch.randperm(4)[:2] for _ in range(5)])
    return real, op, (x, index, weights)


@pytest.mark.parametrize("cls", [LinearTorch, LinearCPU])
def test_linear_out_device_and_dtype(cls, qwen):
    real, op = _linear(cls, qwen, out_device="meta")
    x = torch.randn(2, 3, real.in_features)
    y = op(x)
    assert y.device.type == "meta" and y.shape == (2, 3, real.out_features)
    _, same = _linear(cls, qwen)
    y = same(x.to(torch.bfloat16))
    assert y.device == x.device and y.dtype == torch.bfloat16  # back in the input's dtype


@pytest.mark.parametrize("cls", [ExpertsTorch, ExpertsCPU])
def test_experts_out_device(cls, qwen):
    real, op, args = _experts(cls, qwen, out_device="meta")
    assert op(*args).device.type == "meta"
    _, same, args = _experts(cls, qwen)
    torch.testing.assert_close(same(*args), real(*args), rtol=1e-5, atol=1e-5)


def test_moe_and_rope_out_device(qwen):
    config, model = qwen
    block = MoEBlock(MOE, None, config, copy.deepcopy(model.get_submodule(MOE)), out_device="meta")
    block.load()
    assert block(torch.randn(1, 3, config.hidden_size)).device.type == "meta"
    rope = RotaryEmbedding("model.rotary_emb", None, config, model.model.rotary_emb, out_device="meta")
    rope.load()
    cos, sin = rope(torch.randn(1, 3, 8), torch.arange(3)[None])
    assert cos.device.type == "meta" and sin.device.type == "meta"


def test_mla_out_device():
    config = tiny_config("deepseek_v2")
    model = random_model(config)
    path = "model.layers.0.self_attn"
    op = MLAttention(path, None, config, copy.deepcopy(model.get_submodule(path)), out_device="meta")
    op.load()
    x = torch.randn(1, 3, config.hidden_size)
    out, _ = op(x, position_embeddings=model.model.rotary_emb(x, torch.arange(3)[None]))
    assert out.device.type == "meta"


def test_unsupported_prefill_device_is_logged(qwen, caplog):
    with caplog.at_level("WARNING", logger="graftlm.ops.base"):
        _linear(LinearTorch, qwen, prefill_device="meta")
    assert "computes prefill on its generate_device cpu; prefill_device meta is not used" in caplog.text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_operators_on_cuda_take_and_return_cpu_tensors(qwen):
    real, op = _linear(LinearTorch, qwen, generate_device="cuda")
    x = torch.randn(2, real.in_features)
    y = op(x)
    assert y.device.type == "cpu"
    torch.testing.assert_close(y, real(x), rtol=1e-4, atol=1e-5)
    real_e, experts, args = _experts(ExpertsTorch, qwen, generate_device="cuda", out_device="cuda")
    assert experts(*args).device.type == "cuda"
    # CPU operators take CUDA inputs and hand them back on CUDA.
    _, cpu_linear = _linear(LinearCPU, qwen)
    assert cpu_linear(x.cuda()).device.type == "cuda"
    _, cpu_experts, args = _experts(ExpertsCPU, qwen)
    y = cpu_experts(*(a.cuda() for a in args))
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), real_e(*args), rtol=1e-5, atol=1e-5)
