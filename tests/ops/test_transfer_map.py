"""`model.transfer_map`: layers split across devices, checked with CPU devices against one device."""

from __future__ import annotations

import textwrap

import pytest
import torch

from graftlm.errors import RuleError
from graftlm.inject import apply, load_rules, plan, resolve_operator
from graftlm.models.build import build_meta_model
from graftlm.ops.model import TransferMapModel, move
from graftlm.weights.memory import StateDictSource
from tests.inject.helpers import random_model, tiny_config

KT_RULES = r"""
- match:
    name: "^model$"
  replace:
    class: "ktransformers.operators.models.KDeepseekV2Model"
    kwargs:
      per_layer_prefill_intput_threshold: 0
      transfer_map:
        1: "cpu"
        2: "cpu"
- match:
    name: "^model\\.layers\\.\\d+\\.mlp\\.experts$"
  replace:
    class: experts.torch
  recursive: false
- match:
    name: "^model\\.layers\\.([12])\\."
  replace:
    class: "default"
    kwargs:
      generate_device: "cpu"
- match:
    name: "^model\\.rotary_emb$"
  replace:
    class: rope
"""


def _inject(config, hf, rules):
    meta = build_meta_model(config)
    p = plan(meta, rules, strict=True)
    return apply(meta, p, source=StateDictSource(hf.state_dict()), config=config)


@pytest.mark.parametrize("name", ["deepseek_v2_lite", "qwen2_moe"])
def test_transfer_map_equals_single_device_run(tmp_path, name):
    config = tiny_config(name, num_hidden_layers=3)
    hf = random_model(config)
    path = tmp_path / "split.yaml"
    path.write_text(textwrap.dedent(KT_RULES).lstrip())
    model = _inject(config, hf, load_rules(str(path)))
    assert isinstance(model.model, TransferMapModel)
    assert model.model.transfer_map == {1: torch.device("cpu"), 2: torch.device("cpu")}
    ids = torch.randint(0, config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
        want = hf(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    # Hidden states crossed exactly at the mapped layers, once per forward pass.
    assert model.model.transfers == [(1, "cpu"), (2, "cpu")]


def _split_at_layer_1(layers: int):
    """A tiny Qwen2-MoE of `layers` layers with transfer_map {1: cpu}, and its HF original."""
    config = tiny_config("qwen2_moe", num_hidden_layers=layers)
    hf = random_model(config)
    kwargs = {"transfer_map": {1: "cpu"}}
    rules = load_rules(
        [{"match": {"name": "^model$"}, "replace": {"class": "model.transfer_map", "kwargs": kwargs}}]
    )
    return _inject(config, hf, rules), hf


def test_the_mapped_layer_receives_moved_inputs():
    model, _ = _split_at_layer_1(2)
    seen: list[tuple[str, torch.dtype]] = []
    sent = {}

    def spy(module, args, kwargs):  # runs after the transfer hook: sees what the layer gets
        seen.append((str(args[0].device), args[0].dtype))
        sent["mask_is_moved_copy"] = kwargs.get("position_embeddings") is not None

    model.model.layers[1].register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]))
    assert seen == [("cpu", torch.float32)] and sent["mask_is_moved_copy"]
    assert model.model.transfers == [(1, "cpu")]
    with torch.no_grad():  # the record is per forward pass
        model(torch.tensor([[3]]))
    assert model.model.transfers == [(1, "cpu")]


def test_layers_after_a_boundary_get_its_per_layer_inputs(monkeypatch):
    """HF hands every layer the cos/sin and mask it computed once, on the first device; the layers
    after a boundary must get them on the boundary's device too (one copy per forward pass). Without
    a second device, a fresh clone stands for "moved"."""
    import graftlm.ops.model as model_mod

    def fake_move(value, device):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, tuple | list):
            return type(value)(fake_move(v, device) for v in value)
        return value

    monkeypatch.setattr(model_mod, "move", fake_move)
    model, hf = _split_at_layer_1(4)
    cos_seen: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(
            lambda m, a, kw: cos_seen.append(kw["position_embeddings"][0]), with_kwargs=True
        )
    with torch.no_grad():
        got = model(torch.tensor([[3, 4, 5]])).logits
        want = hf(torch.tensor([[3, 4, 5]])).logits
    assert (got - want).abs().max().item() <= 1e-5
    first, *later = cos_seen
    assert all(c is later[0] for c in later) and later[0] is not first  # one copy, from layer 1 on
    assert torch.equal(later[0], first)
    assert model.model.transfers == [(1, "cpu")]


def test_move_walks_tuples_and_leaves_the_rest():
    cos, sin = torch.ones(2), torch.zeros(2)
    moved = move(((cos, sin), None, 3), torch.device("cpu"))
    assert moved[0][0] is cos and moved[1] is None and moved[2] == 3


def test_alias_and_errors(tmp_path):
    resolved = resolve_operator(
        "ktransformers.operators.models.KDeepseekV2Model",
        {"per_layer_prefill_intput_threshold": 0, "transfer_map": {1: "cuda:1"}},
    )
    assert resolved.cls is TransferMapModel and resolved.kwargs == {"transfer_map": {1: "cuda:1"}}
    config = tiny_config("qwen2_moe", num_hidden_layers=2)
    bad = [
        {
            "match": {"name": "^model$"},
            "replace": {"class": "model.transfer_map", "kwargs": {"transfer_map": {5: "cpu"}}},
        }
    ]
    with pytest.raises(RuleError, match=r"layer index 5 is not in 0\.\.1"):
        _inject(config, random_model(config), load_rules(bad))


def test_the_documented_two_gpu_rules_parse(tmp_path):
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "heterogeneous.md").read_text()
    block = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "two_gpu.yaml"
    path.write_text(block)
    rules = load_rules(str(path))
    assert [r.op for r in rules] == ["model.transfer_map", "experts.cpu", "default", "default"]
    assert rules[0].kwargs == {"transfer_map": {30: "cuda:1"}}


def test_out_device_moves_the_last_hidden_state():
    config = tiny_config("qwen2_moe", num_hidden_layers=2)
    hf = random_model(config)
    kwargs = {"transfer_map": {1: "cpu"}, "out_device": "meta"}
    rules = load_rules(
        [{"match": {"name": "^model$"}, "replace": {"class": "model.transfer_map", "kwargs": kwargs}}]
    )
    model = _inject(config, hf, rules)
    with torch.no_grad():
        out = model.model(torch.tensor([[3, 4]]))
    assert out.last_hidden_state.device.type == "meta" and out.last_hidden_state.shape == (1, 2, 64)
