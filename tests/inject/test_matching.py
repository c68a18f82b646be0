"""Matching semantics: name, class, both, first match wins, recursive: false, default, unmatched."""

import logging

import pytest
import torch
from torch import nn

from graftlm.errors import RuleError
from graftlm.inject import apply, load_rules, plan
from graftlm.ops.base import InjectedModule
from graftlm.ops.linear import LinearTorch
from tests.inject.helpers import meta_model, source_of, tiny_config


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.down = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = MLP()

    def forward(self, x):
        return x + self.mlp(self.attn(x))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 10, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def toy(device="meta"):
    torch.manual_seed(0)
    with torch.device(device):
        return Toy().eval()


def decided(p):
    return {e.path: (e.rule, e.op, e.device) for e in p}


def rule(name=None, cls=None, op="linear.torch", recursive=True, **kwargs):
    match = {k: v for k, v in {"name": name, "class": cls}.items() if v is not None}
    out = {"match": match, "replace": {"class": op, "kwargs": kwargs}}
    if not recursive:
        out["recursive"] = False
    return out


def test_every_module_is_listed_depth_first():
    p = plan(toy(), load_rules(None))
    paths = [e.path for e in p]
    assert paths[:4] == ["", "embed", "layers", "layers.0"]
    assert paths[4:8] == ["layers.0.attn", "layers.0.mlp", "layers.0.mlp.up", "layers.0.mlp.down"]
    assert paths[-1] == "head"
    assert all(e.rule is None and e.op is None and e.device == "cpu" for e in p)


def test_name_only():
    d = decided(plan(toy(), load_rules([rule(name=r"^layers\.0\.", op="default", generate_device="cuda:1")])))
    assert d["layers.0.attn"] == d["layers.0.mlp.up"] == (0, "default", "cuda:1")
    assert d["layers.0"] == (None, None, "cpu")  # the regex needs the dot after the index
    assert d["layers.1.attn"] == (None, None, "cpu")


def test_class_only_dotted_and_bare():
    for cls in ("torch.nn.Linear", "Linear"):
        d = decided(plan(toy(), load_rules([rule(cls=cls)])))
        linears = {p for p, (r, _, _) in d.items() if r == 0}
        assert linears == {"head"} | {
            f"layers.{i}.{n}" for i in (0, 1) for n in ("attn", "mlp.up", "mlp.down")
        }


def test_name_and_class_must_both_hold():
    d = decided(plan(toy(), load_rules([rule(name=r"^layers\.1\.mlp", cls="torch.nn.Linear")])))
    assert {p for p, (r, _, _) in d.items() if r == 0} == {"layers.1.mlp.up", "layers.1.mlp.down"}
    assert d["layers.1.mlp"][0] is None  # matches the name, not the class


def test_first_match_wins():
    rules = load_rules(
        [
            rule(name=r"\.mlp\.", cls="Linear", generate_device="cuda:0"),
            rule(cls="Linear", generate_device="cuda:1"),
        ]
    )
    d = decided(plan(toy(), rules))
    assert d["layers.0.mlp.up"] == (0, "linear.torch", "cuda:0")
    assert d["layers.0.attn"] == (1, "linear.torch", "cuda:1")


def test_recursive_false_stops_the_walk_and_owns_the_bytes():
    rules = load_rules(
        [
            rule(name=r"^layers\.0\.mlp$", op="default", recursive=False, generate_device="cuda:0"),
            rule(cls="Linear"),
        ]
    )
    p = plan(toy(), rules)
    d = decided(p)
    assert "layers.0.mlp.up" not in d and "layers.0.mlp.down" not in d
    assert d["layers.1.mlp.up"][1] == "linear.torch"
    mlp = p.entry("layers.0.mlp")
    assert mlp.stops and mlp.numel == 4 * 8 + 8 + 8 * 4  # up (with bias) and down
    assert p.totals()["cuda:0"] == mlp.numel * 4


def test_unmatched_modules_take_the_default_device_not_the_parent_s():
    rules = load_rules([rule(name=r"^layers\.0$", op="default", generate_device="cuda:0")])
    d = decided(plan(toy(), rules, default_device="cuda:3"))
    assert d["layers.0"] == (0, "default", "cuda:0")
    assert d["layers.0.attn"] == (None, None, "cuda:3")


def test_totals_count_tied_weights_once():
    model = toy()
    model.head.weight = model.embed.weight
    p = plan(model, load_rules(None))
    assert sum(p.totals().values()) == 4 * sum(t.numel() for t in model.parameters())  # dedups too


def test_unmatched_rule_warns_or_fails_when_strict(caplog):
    rules = load_rules(
        [rule(cls="Linear"), rule(name="^nothing$"), rule(name="^nope$", op="default") | {"optional": True}]
    )
    with caplog.at_level(logging.WARNING):
        p = plan(toy(), rules)
    assert [r.index for r in p.unmatched] == [1, 2]
    assert len(caplog.records) == 1 and "<rules>: rule 1: rule matches no module" in caplog.text
    with pytest.raises(RuleError, match=r"<rules>: rule 1: rule matches no module \(name '\^nothing\$'"):
        plan(toy(), rules, strict=True)


def test_hf_class_paths_and_short_aliases():
    model = meta_model(tiny_config("deepseek_v2_lite"))
    for cls in (
        "transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe",
        "DeepseekV2Moe",
        "DeepseekV2MoE",  # KTransformers' spelling
        "ktransformers.models.modeling_deepseek.DeepseekV2MoE",
    ):
        p = plan(model, load_rules([rule(cls=cls, op="default")]))
        assert [e.path for e in p if e.rule == 0] == ["model.layers.1.mlp", "model.layers.2.mlp"], cls


def test_apply_replaces_and_loads_on_the_toy():
    real = toy("cpu")
    model = toy()
    rules = load_rules([rule(name=r"^layers\.0\.mlp$", op="default", recursive=False), rule(cls="Linear")])
    model = apply(model, plan(model, rules), source=source_of(real), config=None)
    assert isinstance(model.head, LinearTorch) and isinstance(model.layers[1].mlp.up, LinearTorch)
    assert type(model.layers[0].mlp.up) is nn.Linear  # under recursive: false
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), real(ids), rtol=0, atol=0)


class Dropper(InjectedModule):
    """Replaces a module and keeps none of its children."""

    def load(self):
        pass

    def forward(self, x):
        return x


def test_operator_that_drops_a_child_a_rule_still_matches_is_an_error():
    rules = load_rules([rule(name=r"^layers\.0\.mlp$", op=f"{__name__}.Dropper"), rule(cls="Linear")])
    model = toy()
    with pytest.raises(
        RuleError,
        match=r"'layers\.0\.mlp\.up' is gone .*'tests\.inject\.test_matching\.Dropper' at 'layers\.0\.mlp'",
    ):
        apply(model, plan(model, rules), source=source_of(toy("cpu")), config=None)
