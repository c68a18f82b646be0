import pytest
import torch

from graftlm.ops.rope import RotaryEmbedding
from tests.inject.helpers import meta_model, random_model, tiny_config

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
}
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES = {
    "llama_default": ("llama", {}),
    "llama_llama3": ("llama", {"rope_parameters": LLAMA3}),
    "llama_linear": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    "qwen3_yarn": ("qwen3", {"rope_parameters": YARN}),
    "deepseek_v2_yarn_complex": ("deepseek_v2_lite", {}),
    "deepseek_v3": ("deepseek_v3", {}),
    "gemma3_per_layer_type": ("gemma3", {}),
}


def _pair(name, overrides):
    config = tiny_config(name, **overrides)
    hf = random_model(config).model.rotary_emb
    op = RotaryEmbedding("model.rotary_emb", None, config, meta_model(config).model.rotary_emb)
    return config, hf, op


@pytest.mark.parametrize("case", list(CASES))
def test_rope_matches_hf(case):
    config, hf, op = _pair(*CASES[case])
    for layer_type in op.layer_types:  # nothing computed before load()
        assert getattr(op, op._buffer_name(layer_type)) is None
    op.load()
    x = torch.randn(2, 5, 8)
    positions = torch.arange(3, 8).unsqueeze(0).expand(2, -1)
    for layer_type in op.layer_types:
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        got, want = op(x, positions, **kwargs), hf(x, positions, **kwargs)
        if isinstance(want, tuple):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
        else:
            assert want.is_complex() and got.is_complex()
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gemma3_has_both_layer_types():
    _, _, op = _pair("gemma3", {})
    assert op.layer_types == ["full_attention", "sliding_attention"]
    op.load()
    assert not torch.equal(op.full_attention_inv_freq, op.sliding_attention_inv_freq)


def test_unload_then_load():
    _, hf, op = _pair("llama", {})
    op.load()
    op.unload()
    assert op.inv_freq is None
    op.load()
    torch.testing.assert_close(op.inv_freq, hf.inv_freq, rtol=0, atol=0)


def test_dynamic_rope_is_not_yet_supported():
    config = tiny_config(
        "llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    )
    with pytest.raises(NotImplementedError, match="'dynamic' is not yet supported"):
        RotaryEmbedding("model.rotary_emb", None, config, meta_model(config).model.rotary_emb)


@pytest.mark.parametrize("case", ["llama_llama3", "qwen3_yarn", "gemma3_per_layer_type"])
def test_one_position_matches_hf_bit_for_bit(case):
    """A decode step's single position comes from a table computed ahead: HF's values exactly,
    across table refills, going back to earlier positions, and for each layer type and dtype."""
    config, hf, op = _pair(*CASES[case])
    op.load()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 1, 8, dtype=dtype)
        for position in [0, 1, 255, 256, 257, 700, 3, 511, 512]:
            for layer_type in op.layer_types:
                kwargs = {} if layer_type is None else {"layer_type": layer_type}
                ids = torch.tensor([[position]])
                got, want = op(x, ids, **kwargs), hf(x, ids, **kwargs)
                for g, w in zip(got, want, strict=True):
                    assert g.shape == w.shape == (1, 1, w.shape[-1]) and g.dtype == dtype
                    torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_one_position_table_built_in_inference_mode_serves_autograd():
    """The engine fills the table under inference_mode; a later call with autograd on must get
    tensors autograd can save (not inference tensors)."""
    config, _, op = _pair(*CASES["llama_default"])
    op.load()
    with torch.inference_mode():
        op(torch.randn(1, 1, 8), torch.tensor([[5]]))
    cos, sin = op(torch.randn(1, 1, 8), torch.tensor([[6]]))
    assert not cos.is_inference() and not sin.is_inference()
    w = torch.randn(cos.shape[-1], requires_grad=True)
    (cos * w).sum().backward()
    assert w.grad is not None
