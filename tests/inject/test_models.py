"""Each architecture, fully injected with its built-in rules, gives Hugging Face's logits."""

import pytest
import torch

from graftlm.inject import apply, load_rules, plan
from graftlm.models.build import build_meta_model
from graftlm.ops.base import InjectedModule
from graftlm.weights.memory import StateDictSource
from tests.inject.helpers import ARCHS, random_model, tiny_config

MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2_lite", "deepseek_v2", "deepseek_v3"}


def _inject(name: str, tensors: dict[str, torch.Tensor]):
    meta = build_meta_model(tiny_config(name))
    rules = load_rules("auto", arch=meta.config.model_type)
    p = plan(meta, rules, strict=True)  # every non-optional built-in rule must match something
    return apply(meta, p, source=StateDictSource(tensors), config=meta.config), rules


@pytest.mark.parametrize("arch", list(ARCHS))
def test_builtin_rules_match_hf_logits(arch):
    name, builtin = ARCHS[arch]
    hf = random_model(tiny_config(name))
    model, rules = _inject(name, hf.state_dict())
    assert rules.source == f"builtin:{builtin}"

    ops = {m.op_name for m in model.modules() if isinstance(m, InjectedModule)}
    expected = {"embedding.cpu", "rope", "linear.cpu", "norm.cpu", "decoder.cpu"} | (
        {"moe", "experts.cpu"} if arch in MOE else set()
    )
    if builtin == "deepseek2":
        expected.add("attention.mla")  # MLA over the latent cache is DeepSeek's default attention
    else:
        expected.add("attention.gqa")  # the Llama family's attention, RoPE in one C call
    if arch not in ("mixtral", "qwen3_moe"):  # all-MoE models have no dense MLP
        expected.add("mlp.cpu")
    assert ops == expected
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    assert not any(type(m).__name__.endswith("RMSNorm") for m in model.modules())  # all norm.cpu
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])

    ids = torch.randint(0, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_tied_head_reads_the_embedding_when_the_file_has_no_head():
    hf = random_model(tiny_config("qwen2"))  # tie_word_embeddings=True
    tensors = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    model, _ = _inject("qwen2", tensors)
    ids = torch.arange(1, 8).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_deepseek_v3_correction_bias_comes_from_the_weights():
    hf = random_model(tiny_config("deepseek_v3"))
    model, _ = _inject("deepseek_v3", hf.state_dict())
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # the random bias, not the constructor's zeros
    torch.testing.assert_close(bias, hf.model.layers[1].mlp.gate.e_score_correction_bias, rtol=0, atol=0)
