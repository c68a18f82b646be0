"""Rule files: loading, and every error naming the file, the rule's index and its line."""

import textwrap

import pytest

from graftlm.errors import RuleError
from graftlm.inject import load_rules
from graftlm.inject.rules import ARCH_RULES, builtin_names


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def error(path) -> str:
    with pytest.raises(RuleError) as err:
        load_rules(str(path))
    return str(err.value)


def test_a_valid_file_loads_with_origins(tmp_path):
    path = write(
        tmp_path,
        r"""
        # a comment
        - match:
            name: "^model\\.layers\\..*\\.mlp\\.experts$"
          replace:
            class: experts.torch
            kwargs: {generate_device: "cpu"}
          recursive: false
        - match:
            class: torch.nn.Linear
          replace:
            class: linear.torch
            kwargs:
              dtype: bfloat16
        """,
    )
    rules = load_rules(str(path))
    assert [r.op for r in rules] == ["experts.torch", "linear.torch"]
    assert [(r.origin.index, r.origin.line) for r in rules] == [(0, 2), (1, 8)]
    assert rules[0].recursive is False and rules[1].recursive is True
    assert rules[0].name.pattern == r"^model\.layers\..*\.mlp\.experts$"
    assert rules[1].kwargs == {"dtype": "bfloat16"}


def test_replace_class_defaults_to_default(tmp_path):
    rules = load_rules(
        str(write(tmp_path, '- match: {name: "^lm_head$"}\n  replace: {kwargs: {generate_device: cpu}}\n'))
    )
    assert rules[0].op == "default" and rules[0].op_cls is None


def test_unknown_keys_with_suggestions(tmp_path):
    path = write(
        tmp_path,
        """
        - match:
            nmae: "^lm_head$"
          replace:
            class: linear.torch
        - match:
            name: "^lm_head$"
          replace:
            class: linear.torch
          recursve: false
        """,
    )
    msg = error(path)
    assert (
        f"{path}: rule 0 (line 2): unknown key 'nmae' in match (allowed: name, class); did you mean 'name'?"
        in msg
    )
    assert (
        f"{path}: rule 1 (line 9): unknown key 'recursve' (allowed: match, replace, recursive, optional); did you mean 'recursive'?"
        in msg
    )


def test_missing_and_empty_parts(tmp_path):
    path = write(tmp_path, "- match: {name: x}\n- match: {}\n  replace: {class: default}\n")
    msg = error(path)
    assert f"{path}: rule 0 (line 1): missing key 'replace'" in msg
    assert f"{path}: rule 1 (line 2): match needs 'name', 'class' or both" in msg


def test_bad_regex(tmp_path):
    path = write(tmp_path, '- match: {name: "^model\\\\.layers\\\\.("}\n  replace: {class: default}\n')
    assert error(path).startswith(
        f"{path}: rule 0 (line 1): bad regex in match.name '^model\\.layers\\.(': missing )"
    )


@pytest.mark.parametrize(
    "cls, expected",
    [
        ("torch.nn.Linaer", "module 'torch.nn' has no class 'Linaer'; did you mean Linear"),
        (
            "DeepseekV2Mo",
            "no class named 'DeepseekV2Mo' in torch.nn or any transformers model; did you mean DeepseekV2Moe",
        ),
        (
            "transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2MoE",
            "module 'transformers.models.deepseek_v2.modeling_deepseek_v2' has no class 'DeepseekV2MoE'; did you mean DeepseekV2Moe",
        ),
        ("nowhere.Thing", "no class 'nowhere.Thing': cannot import 'nowhere'"),
        ("transformers.PretrainedConfig", "'transformers.PretrainedConfig' is not a torch.nn.Module class"),
    ],
)
def test_class_that_does_not_exist(tmp_path, cls, expected):
    path = write(tmp_path, f"- match: {{class: {cls}}}\n  replace: {{class: default}}\n")
    assert error(path).startswith(f"{path}: rule 0 (line 1): {expected}")


@pytest.mark.parametrize(
    "replace, expected",
    [
        (
            "{class: linear.torch, kwargs: {my_param: 1}}",
            "operator 'linear.torch' does not take 'my_param' (it takes dtype, generate_device, out_device, prefill_device)",
        ),
        (
            "{class: moe, kwargs: {routing: mixtral, topk: 2}}",
            "operator 'moe' does not take 'topk' (it takes dtype, generate_device, out_device, overlap, prefill_device, routing)",
        ),
        (
            "{class: default, kwargs: {dtype: bfloat16}}",
            "operator 'default' does not take 'dtype' (it takes generate_device, prefill_device)",
        ),
        ("{class: linear.torch, kwargs: {key: x}}", "operator 'linear.torch' does not take 'key'"),
        ("{class: linear.torch, kwargs: {generate_device: gpu0}}", "generate_device: 'gpu0' is not a device"),
        ("{class: linear.torch, kwargs: {dtype: float8}}", "unknown dtype 'float8'"),
        (
            "{class: linear.torhc}",
            "no operator 'linear.torhc' (cannot import 'linear': No module named 'linear'); did you mean 'linear.torch'",
        ),
        ("{class: lineartorch}", "no operator named 'lineartorch'; did you mean 'linear.torch'"),
        (
            "{class: torch.nn.Linear}",
            "'torch.nn.Linear' is not an operator (a subclass of graftlm.ops.base.InjectedModule)",
        ),
        (
            "{class: attention.mla}",
            "operator 'attention.mla' (the MLA attention operator) is not yet supported",
        ),
    ],
)
def test_operator_and_kwargs_errors(tmp_path, replace, expected, torch_only_registry):
    path = write(tmp_path, f'- match: {{name: "^lm_head$"}}\n  replace: {replace}\n')
    assert error(path).startswith(f"{path}: rule 0 (line 1): {expected}")


def test_all_errors_reported_together_with_lines(tmp_path):
    path = write(
        tmp_path,
        """
        - match: {name: "^a$"}
          replace: {class: linear.torch}
        - match: {name: "("}
          replace: {class: default}
        - match: {name: "^b$"}
          replace: {class: linear.torch}
        - match: {clas: Linear}
          replace: {class: default}
        """,
    )
    msg = error(path)
    assert msg.startswith("invalid injection rules:\n")
    assert f"{path}: rule 1 (line 3): bad regex" in msg
    assert f"{path}: rule 3 (line 7): unknown key 'clas' in match" in msg
    assert "rule 0" not in msg and "rule 2" not in msg


def test_not_yaml_and_not_a_list(tmp_path):
    assert error(write(tmp_path, "- match: {name: [\n")).startswith(
        f"{tmp_path / 'r.yaml'} (line 2): not valid YAML"
    )
    assert error(write(tmp_path, "match: {name: x}\n", "m.yaml")).endswith(
        "a rule file is a YAML list of rules, not a dict"
    )


def test_empty_file_is_no_rules(tmp_path):
    assert len(load_rules(str(write(tmp_path, "# nothing yet\n")))) == 0


def test_include_relative_and_builtin(tmp_path):
    write(tmp_path, '- match: {name: "^lm_head$"}\n  replace: {class: default}\n', "head.yaml")
    path = write(tmp_path, "- include: head.yaml\n- include: builtin:base\n")
    rules = load_rules(str(path))
    assert [str(r.origin) for r in rules] == [
        f"{tmp_path / 'head.yaml'}: rule 0 (line 1)",
        "builtin:base: rule 0 (line 5)",
        "builtin:base: rule 1 (line 12)",
        "builtin:base: rule 2 (line 20)",
    ]
    assert [r.index for r in rules] == [0, 1, 2, 3]


def test_include_errors(tmp_path):
    write(tmp_path, "- include: a.yaml\n", "b.yaml")
    a = write(
        tmp_path,
        "- include: b.yaml\n- include: missing.yaml\n- include: builtin:nope\n- {include: x.yaml, recursive: false}\n",
        "a.yaml",
    )
    msg = error(a)
    assert "included from itself" in msg
    assert f"{tmp_path / 'missing.yaml'}: cannot read rule file" in msg
    assert f"{a}: rule 2 (line 3): no built-in rules named 'nope'" in msg
    assert f"{a}: rule 3 (line 4): an include item is exactly `- include: FILE`" in msg


def test_specs_none_list_auto_builtin():
    assert len(load_rules(None)) == 0
    listed = load_rules([{"match": {"class": "Linear"}, "replace": {"class": "linear.torch"}}])
    assert listed[0].origin.file == "<rules>" and listed[0].origin.line is None
    assert load_rules("auto", arch="deepseek2").source == "builtin:deepseek2"
    assert load_rules("auto", arch="mixtral").source == "builtin:llama"
    assert load_rules("builtin:qwen3moe").source == "builtin:qwen3moe"
    with pytest.raises(RuleError, match="no built-in rules for architecture 'bert'"):
        load_rules("auto", arch="bert")
    with pytest.raises(RuleError, match="needs the model's architecture"):
        load_rules("auto")
    with pytest.raises(
        RuleError, match=r"no built-in rules named 'deepseek' \(built-in: attention, base, decoder, deepseek2"
    ):
        load_rules("builtin:deepseek")
    with pytest.raises(RuleError, match="no such rule file"):
        load_rules("/nonexistent/rules.yaml")


def test_every_builtin_file_loads_and_every_arch_has_one():
    for name in builtin_names():
        assert len(load_rules(f"builtin:{name}")) > 0
    assert set(ARCH_RULES.values()) <= set(builtin_names())
