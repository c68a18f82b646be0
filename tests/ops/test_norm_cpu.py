"""`norm.cpu` against the transformers RMSNorm modules it replaces, and its refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

import graftlm
from graftlm.kernels.cpu import fused, qblocks
from graftlm.ops.norm_cpu import NormCPU
from graftlm.weights.convert import convert
from graftlm.weights.memory import StateDictSource
from tests.models.tiny import VOCAB, make_model

# class, offset norm.cpu must find (Gemma's forward multiplies by 1 + weight)
CLASSES = [(LlamaRMSNorm, 0.0), (Qwen3RMSNorm, 0.0), (DeepseekV2RMSNorm, 0.0), (Gemma3RMSNorm, 1.0)]


def _op(orig: nn.Module, weight: torch.Tensor, key: str = "model.norm") -> NormCPU:
    with torch.device("meta"):
        meta = type(orig)(weight.shape[0], eps=orig_eps(orig))
    op = NormCPU(key, StateDictSource({f"{key}.weight": weight}), None, meta)
    op.load()
    return op


def orig_eps(module: nn.Module) -> float:
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


@pytest.mark.parametrize("cls,offset", CLASSES)
@pytest.mark.parametrize("dim", [64, 640, 13])
def test_matches_the_module_it_replaces(cls, offset, dim):
    gen = torch.Generator().manual_seed(dim)
    ref = cls(dim, eps=1e-6)
    weight = torch.randn(dim, generator=gen)
    with torch.no_grad():
        ref.weight.copy_(weight)
    op = _op(ref, weight)
    assert op.offset == offset
    for shape in [(1, 1, dim), (2, 5, dim), (3, 4, 7, dim)]:
        x = torch.randn(*shape, generator=gen) * 5
        with torch.inference_mode():
            got, want = op(x), ref(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_kernel_against_the_formula():
    gen = torch.Generator().manual_seed(0)
    for rows, dim in [(1, 8), (3, 2048), (200, 640), (7, 9)]:  # 200 x 640: the threaded path
        x, w = torch.randn(rows, dim, generator=gen) * 3, torch.randn(dim, generator=gen)
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
        torch.testing.assert_close(fused.rmsnorm(x, w, 1e-5), want, rtol=2e-6, atol=2e-6)
        zero = fused.rmsnorm(torch.zeros(rows, dim), w, 1e-5)  # eps keeps a zero row finite
        assert torch.equal(zero, torch.zeros(rows, dim))


def test_torch_fallback(monkeypatch):
    monkeypatch.setattr(qblocks, "available", lambda: False)
    x, w = torch.randn(4, 32), torch.randn(32)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(fused.rmsnorm(x, w, 1e-6), want)


def test_bfloat16_input_gives_bfloat16():
    ref = LlamaRMSNorm(32, eps=1e-6)
    op = _op(ref, torch.ones(32))
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = op(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref(x.float()).bfloat16(), rtol=1e-2, atol=1e-2)


class _LayerNormLike(nn.Module):
    """One weight and an eps, like an RMSNorm, but it subtracts the mean: norm.cpu must refuse it."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, None, self.eps)


def test_refuses_a_module_that_is_not_an_rmsnorm():
    weight = torch.randn(16)
    with pytest.raises(ValueError, match=r"model\.norm.*_LayerNormLike.*does not compute"):
        _op(_LayerNormLike(16), weight)
    with torch.device("meta"):
        layer_norm = nn.LayerNorm(16)  # a bias too: refused before loading
    with pytest.raises(ValueError, match=r"norm\.cpu at 'x'.*LayerNorm"):
        NormCPU("x", StateDictSource({}), None, layer_norm)


def test_refuses_other_devices():
    with torch.device("meta"):
        meta = LlamaRMSNorm(8)
    with pytest.raises(ValueError, match="runs on the CPU"):
        NormCPU("x", StateDictSource({}), None, meta, generate_device="cuda")


@pytest.mark.parametrize("arch", ["gemma3", "qwen3", "deepseek_v2", "llama"])
def test_auto_rules_place_it_and_logits_follow_hf(arch, tmp_path):
    folder = tmp_path / arch
    make_model(arch, folder)
    path = convert(folder, tmp_path / "f32.gguf", "f32")
    plain = graftlm.load(path, progress=False)  # every module as transformers defines it
    fast = graftlm.load(path, rules="auto", progress=False)
    norms = [m for m in fast.model.modules() if isinstance(m, NormCPU)]
    layers = fast.model.config.num_hidden_layers
    assert len(norms) >= 2 * layers + 1  # at least each layer's two and the final one
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(fast.model(ids).logits, plain.model(ids).logits, rtol=1e-4, atol=1e-4)
