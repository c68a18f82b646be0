"""`graftlm inspect`: the plan of a real model folder, without reading a weight."""

import json

import pytest

from graftlm.cli import main
from graftlm.weights import safetensors_source
from tests.inject.helpers import random_model, tiny_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek_v3")
    random_model(tiny_config("deepseek_v3")).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def no_weight_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("inspect read a weight")

    monkeypatch.setattr(safetensors_source.SafetensorsSource, "get", refuse)
    monkeypatch.setattr(safetensors_source.SafetensorsSource, "raw", refuse)


def run(capsys, *argv):
    code = main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_plan(folder, capsys):
    code, out, _ = run(capsys, folder, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["rules"] == "builtin:deepseek2" and data["dtype"] == "float32"
    modules = {m["path"]: m for m in data["modules"]}
    assert modules["model.layers.1.mlp"]["op"] == "moe" and modules["model.layers.1.mlp"]["rule"] == 1
    experts = modules["model.layers.1.mlp.experts"]
    assert experts["op"] == "experts.cpu" and experts["stops"] and experts["device"] == "cpu"
    e, h, i = 8, 64, 32
    assert experts["bytes"] == 4 * e * (2 * i * h + h * i)
    assert modules["lm_head"]["op"] == "linear.cpu" and modules["model.rotary_emb"]["op"] == "rope"
    assert modules["model.layers.0.mlp"]["op"] == "mlp.cpu"  # the dense first layer's MLP
    assert modules["model.embed_tokens"]["op"] == "embedding.cpu"
    assert data["totals"] == {"cpu": sum(m["bytes"] for m in data["modules"])}
    assert data["totals"]["cpu"] == 4 * sum(m["numel"] for m in data["modules"])
    # the V2 block rule is optional and finds nothing in a V3 model
    assert [(r["index"], r["optional"]) for r in data["unmatched_rules"]] == [(0, True)]


def test_text_table_and_dtype(folder, capsys):
    code, out, _ = run(capsys, folder, "--dtype", "bfloat16")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["MODULE", "CLASS", "RULE", "OPERATOR", "DEVICE", "BYTES"]
    experts = next(line for line in lines if line.startswith("model.layers.1.mlp.experts "))
    assert experts.split()[1:6] == ["DeepseekV3Experts", "2", "experts.cpu", "(whole", "subtree)"]
    assert experts.split()[6:] == ["cpu", "96.0", "KiB"]  # 8 x 96 x 64 weights at 2 bytes
    assert "totals per device:" in lines and "rules that matched no module:" in lines
    assert any("rule 0 -> moe (optional)  [builtin:deepseek2: rule 0 (line 4)]" in line for line in lines)


def test_strict_fails_on_a_rule_that_matches_nothing(folder, tmp_path, capsys):
    rules = tmp_path / "r.yaml"
    rules.write_text(
        '- match: {class: torch.nn.Linear}\n  replace: {class: linear.torch}\n- match: {name: "^nothing$"}\n  replace: {class: default}\n'
    )
    code, out, _ = run(capsys, folder, "--rules", rules)
    assert code == 0 and f"rule 1 -> default  [{rules}: rule 1 (line 3)]" in out
    code, _, err = run(capsys, folder, "--rules", rules, "--strict")
    assert code == 2
    assert f"{rules}: rule 1 (line 3): rule matches no module (name '^nothing$' -> default)" in err


def test_no_rules(folder, capsys):
    code, out, _ = run(capsys, folder, "--rules", "none", "--json")
    data = json.loads(out)
    assert code == 0 and all(m["rule"] is None for m in data["modules"]) and data["unmatched_rules"] == []


def test_bad_rules_and_dtype_are_clean_errors(folder, tmp_path, capsys):
    code, _, err = run(capsys, folder, "--rules", "builtin:nope")
    assert code == 2 and "no built-in rules named 'nope'" in err
    code, _, err = run(capsys, folder, "--dtype", "float8")
    assert code == 2 and "unknown dtype 'float8'" in err


def test_auto_rules_refuse_an_accelerator_device(folder, capsys):
    # The built-in rules place CPU operators; on another device they say so instead of guessing.
    code, _, err = run(capsys, folder, "--device", "cuda:0")
    assert code == 2 and "rules='auto' places graftlm's CPU operators" in err


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory):
    """A tiny Qwen3-MoE as Q8_0 GGUF (module scope: made before the weight-read guard is set)."""
    from graftlm.weights.convert import convert
    from tests.models.tiny import make_model

    root = tmp_path_factory.mktemp("qwen3_moe")
    make_model("qwen3_moe", root / "hf")
    return convert(root / "hf", root / "q8_0.gguf", "q8_0")


def test_gguf_operators_count_the_blocks_they_keep(q8_gguf, capsys):
    """On a GGUF with graftlm's CPU operators, each module holds the file's blocks: the totals are the
    file's tensor bytes (plain modules' at float32), and the same file without rules holds its values at the dtype."""
    import gguf

    tensors = gguf.GGUFReader(str(q8_gguf)).tensors
    stored = {t.name: int(t.n_bytes) for t in tensors}
    # the router (ffn_gate_inp) stays a plain module: its Q8_0 values held at float32
    held = {t.name: 4 * int(t.n_elements) if "ffn_gate_inp" in t.name else int(t.n_bytes) for t in tensors}
    code, out, _ = run(capsys, q8_gguf, "--json", "--rules", "auto")
    assert code == 0
    data = json.loads(out)
    experts = next(m for m in data["modules"] if m["path"] == "model.layers.0.mlp.experts")
    exps = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    assert experts["bytes"] == sum(stored[f"blk.0.{t}.weight"] for t in exps)
    assert data["totals"] == {"cpu": sum(held.values())}
    code, out, _ = run(capsys, q8_gguf, "--json", "--rules", "none")
    data = json.loads(out)
    assert data["totals"]["cpu"] == 4 * sum(m["numel"] for m in data["modules"]) > sum(stored.values())


def test_a_plan_for_a_missing_device_is_shown_with_a_warning(folder, tmp_path, capsys, caplog):
    import logging

    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a torch without CUDA")
    rules = tmp_path / "gpu.yaml"
    rules.write_text(
        "- match: {name: '^lm_head$'}\n  replace: {class: default, kwargs: {generate_device: 'cuda:7'}}\n"
    )
    with caplog.at_level(logging.WARNING):
        code, out, _ = run(capsys, folder, "--rules", rules)
    assert code == 0 and "cuda:7:" in out  # the plan is still shown
    assert "device 'cuda:7' is not available" in caplog.text and "loading it here would fail" in caplog.text
