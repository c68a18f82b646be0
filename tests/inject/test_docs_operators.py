"""The walkthrough in docs/operators.md runs as written."""

import contextlib
import io
import re
import sys
from pathlib import Path

import pytest
import torch

from graftlm.errors import RuleError
from graftlm.inject import load_rules, registry
from graftlm.ops.linear_cpu import LinearCPU

DOC = Path(__file__).resolve().parents[2] / "docs" / "operators.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The doc's files written out, `my_ops` importable, and the registry restored afterwards."""
    python, yaml_blocks = _blocks("python"), _blocks("yaml")
    ops_code = next(b for b in python if b.startswith("# my_ops.py"))
    rules = next(b for b in yaml_blocks if b.startswith("# my_rules.yaml"))
    (tmp_path / "my_ops.py").write_text(ops_code)
    (tmp_path / "my_rules.yaml").write_text(rules)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_OPERATORS", dict(registry.operators()))
    monkeypatch.delitem(sys.modules, "my_ops", raising=False)
    yield tmp_path
    sys.modules.pop("my_ops", None)


def test_walkthrough_runs_and_matches_the_reference(workdir):
    usage = next(b for b in _blocks("python") if "apply(model, plan(model, rules)" in b)
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(usage, "docs/operators.md", "exec"), scope)
    import my_ops

    model, reference = scope["model"], scope["reference"]
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, my_ops.LinearInt8)
    assert isinstance(layer.mlp.gate_proj, my_ops.LinearInt8)
    assert isinstance(layer.self_attn.q_proj, LinearCPU)  # the included built-in rules
    assert layer.mlp.down_proj.qweight.dtype == torch.int8
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    diff = (got - want).abs().max().item()
    assert 0 < diff < 0.02 * want.abs().max().item()  # int8 rounding: close, yet really quantized
    assert "LinearInt8(key='model.layers.0.mlp.down_proj'" in out.getvalue()
    assert registry.get_operator("linear.int8") is my_ops.LinearInt8  # the short name registered


def test_walkthrough_kwarg_typo_is_reported_at_load_rules(workdir):
    rules = workdir / "my_rules.yaml"
    rules.write_text(rules.read_text().replace("per_channel:", "per_chanel:"))
    with pytest.raises(RuleError) as err:
        load_rules("my_rules.yaml")
    expected = next(line for line in DOC.read_text().splitlines() if "per_chanel" in line)
    assert str(err.value) == expected.removeprefix("graftlm: error: ")
