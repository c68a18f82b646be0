"""KTransformers rule files through the alias table."""

import textwrap

import pytest
import torch
from torch import nn

from graftlm.errors import RuleError
from graftlm.inject import apply, load_rules, plan, registry
from graftlm.models.build import build_meta_model
from graftlm.ops.experts import ExpertsTorch
from graftlm.ops.linear import LinearTorch
from graftlm.ops.moe import MoEBlock
from graftlm.ops.rope import RotaryEmbedding
from graftlm.weights.memory import StateDictSource
from tests.inject.helpers import random_model, tiny_config

KT = "ktransformers.operators"

# In the style of KTransformers' DeepSeek-V2-Lite-Chat rules: GPU Marlin linears, CPU experts,
# MLA attention, and the layer-wise model operator.
ORIGINAL = rf"""
- match:
    class: ktransformers.models.modeling_deepseek.DeepseekV2YarnRotaryEmbedding
  replace:
    class: {KT}.RoPE.YarnRotaryEmbedding
    kwargs: {{generate_device: "cuda", prefill_device: "cuda"}}
- match:
    name: "^model\\.layers\\.(?!.*self_attn\\.kv_b_proj).*$"   # all but kv_b_proj
    class: torch.nn.Linear
  replace:
    class: {KT}.linear.KTransformersLinear
    kwargs:
      generate_device: "cuda"
      prefill_device: "cuda"
      generate_op: "KLinearMarlin"
      prefill_op: "KLinearTorch"
- match:
    name: "^lm_head"
    class: torch.nn.Linear
  replace:
    class: {KT}.linear.KTransformersLinear
    kwargs:
      generate_device: "cpu"
      prefill_device: "cuda"
      generate_op: "KLinearMarlin"
      prefill_op: "KLinearTorch"
- match:
    name: "^model\\.layers\\..*\\.mlp$"
    class: ktransformers.models.modeling_deepseek.DeepseekV2MoE
  replace:
    class: {KT}.experts.KDeepseekV2MoE
    kwargs: {{generate_device: "cuda", prefill_device: "cuda"}}
- match:
    name: "^model\\.layers\\..*\\.mlp\\.experts$"
  replace:
    class: {KT}.experts.KTransformersExperts
    kwargs:
      prefill_device: "cuda"
      prefill_op: "KExpertsTorch"
      generate_device: "cpu"
      generate_op: "KExpertsCPU"
      out_device: "cuda"
  recursive: False
- match:
    name: "^model\\.layers\\..*\\.self_attn$"
  replace:
    class: {KT}.attention.KDeepseekV2Attention
    kwargs: {{generate_device: "cuda", prefill_device: "cuda"}}
- match:
    name: "^model$"
  replace:
    class: "{KT}.models.KDeepseekV2Model"
    kwargs:
      per_layer_prefill_intput_threshold: 0
- match:
    name: "^model.embed_tokens"
  replace:
    class: "default"
    kwargs: {{generate_device: "cpu", prefill_device: "cpu"}}
"""

# The same file for a CPU-only machine today: torch backends, and the operators graftlm does not
# have yet (MLA attention, the layer-wise model) left as `default`.
TORCH = (
    ORIGINAL.replace('"cuda"', '"cpu"')
    .replace("KLinearMarlin", "KLinearTorch")
    .replace("KExpertsCPU", "KExpertsTorch")
    .replace(f"{KT}.attention.KDeepseekV2Attention", "default")
    .replace(f'"{KT}.models.KDeepseekV2Model"', "default")
    .replace("      per_layer_prefill_intput_threshold: 0\n", "      generate_device: cpu\n")
)


def _write(tmp_path, text, name="kt.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def test_original_file_fails_clearly_naming_every_unsupported_rule(tmp_path, torch_only_registry):
    path = _write(tmp_path, ORIGINAL)
    with pytest.raises(RuleError) as err:
        load_rules(path)
    lines = str(err.value).splitlines()[1:]
    text = textwrap.dedent(ORIGINAL).lstrip().splitlines()
    line = [n + 1 for n, s in enumerate(text) if s.startswith("- match:")]  # each rule's line
    assert [s.strip() for s in lines] == [
        f"{path}: rule 1 (line {line[1]}): operator 'linear.marlin' (GPU Marlin linear) is not yet supported",
        f"{path}: rule 2 (line {line[2]}): operator 'linear.marlin' (GPU Marlin linear) is not yet supported",
        f"{path}: rule 4 (line {line[4]}): operator 'experts.cpu' (fast CPU experts kernels) is not yet supported",
        f"{path}: rule 5 (line {line[5]}): operator 'attention.mla' (the MLA attention operator) is not yet supported",
        f"{path}: rule 6 (line {line[6]}): operator 'model.transfer_map' (the model operator with a layer transfer_map) "
        "is not yet supported",
    ]


def test_torch_version_runs_and_matches_hf(tmp_path):
    rules = load_rules(_write(tmp_path, TORCH))
    assert [r.op for r in rules] == [
        "rope",
        "linear.torch",
        "linear.torch",
        "moe",
        "experts.torch",
        "default",
        "default",
        "default",
    ]
    assert rules[4].alias == f"{KT}.experts.KTransformersExperts"
    assert rules[4].kwargs == {"prefill_device": "cpu", "generate_device": "cpu", "out_device": "cpu"}

    config = tiny_config("deepseek_v2_lite")
    hf = random_model(config)
    meta = build_meta_model(config)
    p = plan(meta, rules, strict=True)
    model = apply(meta, p, source=StateDictSource(hf.state_dict()), config=config)

    layer = model.model.layers[1]
    assert isinstance(model.model.rotary_emb, RotaryEmbedding)
    assert isinstance(layer.mlp, MoEBlock) and isinstance(layer.mlp.experts, ExpertsTorch)
    assert isinstance(layer.self_attn.q_proj, LinearTorch) and isinstance(model.lm_head, LinearTorch)
    assert type(layer.self_attn.kv_b_proj) is nn.Linear  # the negative lookahead keeps it plain
    assert isinstance(model.model.layers[0].mlp.gate_proj, LinearTorch)  # the dense first layer

    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def _one(replace: str) -> str:
    return f'- match: {{name: "\\\\.mlp\\\\.experts$"}}\n  replace: {replace}\n'


def test_registering_the_operator_later_makes_the_alias_work(tmp_path, torch_only_registry):
    path = _write(
        tmp_path, _one(f"{{class: {KT}.experts.KTransformersExperts, kwargs: {{generate_op: KExpertsCPU}}}}")
    )
    with pytest.raises(RuleError, match="'experts.cpu' .* is not yet supported"):
        load_rules(path)

    class ExpertsCPU(ExpertsTorch):
        pass

    registry.register_operator("experts.cpu", ExpertsCPU)  # into the fixture's copy of the registry
    assert load_rules(path)[0].op_cls is ExpertsCPU
    # with no generate_op, KTransformers' default backend is the CPU one too
    assert (
        load_rules(_write(tmp_path, _one(f"{{class: {KT}.experts.KTransformersExperts}}"), "d.yaml"))[
            0
        ].op_cls
        is ExpertsCPU
    )


@pytest.mark.parametrize(
    "replace, op",
    [
        (
            f"{{class: {KT}.experts.KTransformersMLPExpert, kwargs: {{generate_mlp_type: MLPExpertsTorch}}}}",
            "experts.torch",
        ),
        (
            f"{{class: {KT}.linear.KTransformerLinear, kwargs: {{generate_op: QuantizedLinearTorch}}}}",
            "linear.torch",
        ),
        (f"{{class: {KT}.experts.KQwen2MoeSparseMoeBlock}}", "moe"),
        (f"{{class: {KT}.experts.KMistralSparseMoEBlock}}", "moe"),
        (f"{{class: {KT}.RoPE.RotaryEmbedding, kwargs: {{generate_device: cpu}}}}", "rope"),
    ],
)
def test_aliases(tmp_path, replace, op):
    assert load_rules(_write(tmp_path, _one(replace)))[0].op == op


@pytest.mark.parametrize(
    "replace, message",
    [
        (
            f"{{class: {KT}.experts.KTransformersExperts, kwargs: {{generate_op: KExpertsGPU}}}}",
            f"{KT}.experts.KTransformersExperts: unknown generate_op 'KExpertsGPU'; graftlm maps KExpertsCPU, KExpertsTorch, KExpertsMarlin",
        ),
        (
            f"{{class: {KT}.experts.KTransformersExperts, kwargs: {{generate_op: KExpertsTorch, prefill_op: KExpertsMarlin}}}}",
            "operator 'experts.marlin' (GPU Marlin experts) is not yet supported",
        ),
        (
            f"{{class: {KT}.experts.KSomethingNew}}",
            f"no graftlm alias for the KTransformers operator '{KT}.experts.KSomethingNew'",
        ),
        (
            f"{{class: {KT}.experts.KTransformersExperts, kwargs: {{generate_op: KExpertsTorch, backend: llamafile}}}}",
            "operator 'experts.torch' does not take 'backend'",
        ),
    ],
)
def test_alias_errors(tmp_path, replace, message):
    path = _write(tmp_path, _one(replace))
    with pytest.raises(RuleError) as err:
        load_rules(path)
    assert str(err.value).startswith(f"{path}: rule 0 (line 1): {message}")
