"""Placement from a memory budget, planned for a fake "cuda:0" from the meta model alone."""

from __future__ import annotations

import pytest
import torch

from graftlm.inject import load_rules, plan
from graftlm.inject.placement import PlacementError, parse_size, plan_placement
from tests.inject.helpers import meta_model, tiny_config

GPU = "cuda:0"


def _sizes(model, itemsize=2):
    experts = {
        i: sum(p.numel() for p in layer.mlp.experts.parameters()) * itemsize
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "experts")
    }
    total = sum(p.numel() for p in model.parameters()) * itemsize
    return total - sum(experts.values()), experts


@pytest.mark.parametrize("name", ["deepseek_v2_lite", "qwen2_moe"])
def test_dense_first_then_as_many_expert_layers_as_fit(name, tmp_path):
    config = tiny_config(name, num_hidden_layers=4)
    model = meta_model(config)
    dense, experts = _sizes(model)
    moe_layers = sorted(experts)
    # Room for the dense part and the routed experts of exactly the first MoE layer (plus change).
    budget = dense + experts[moe_layers[0]] + experts[moe_layers[1]] // 2
    placement = plan_placement(model, config, device=GPU, gpu_memory=budget)
    assert placement.gpu_layers == moe_layers[:1] and placement.cpu_layers == moe_layers[1:]
    assert placement.dense_bytes == dense and placement.gpu_bytes == dense + experts[moe_layers[0]]

    p = plan(model, load_rules(placement.rules, device=GPU), default_device="cpu", strict=True)
    devices = p.devices()
    first, rest = moe_layers[0], moe_layers[1:]
    assert devices[f"model.layers.{first}.mlp.experts"] == GPU
    assert p.entry(f"model.layers.{first}.mlp.experts").op == "experts.torch"
    for i in rest:
        assert devices[f"model.layers.{i}.mlp.experts"] == "cpu"
        assert p.entry(f"model.layers.{i}.mlp.experts").op == "experts.cpu"
    # Everything that is not a routed expert is on the accelerator: attention, norms, router,
    # shared experts, embeddings, lm_head.
    for path in (
        "",
        "model.embed_tokens",
        "model.norm",
        "lm_head",
        "model.layers.1.self_attn",
        "model.layers.1.input_layernorm",
        "model.layers.1.mlp",
        "model.layers.1.mlp.gate",
    ):
        assert devices[path] == GPU, path
    assert p.entry("lm_head").op == "linear.torch"
    shared = [path for path in devices if ".shared_expert" in path]
    assert shared and all(devices[path] == GPU for path in shared)
    if name == "deepseek_v2_lite":
        assert p.entry("model.layers.1.self_attn").op == "attention.mla"

    # The written YAML, read back as rules, gives the same plan.
    path = tmp_path / "placed.yaml"
    path.write_text(placement.to_yaml())
    again = plan(model, load_rules(str(path), device=GPU), default_device="cpu", strict=True)
    assert again.devices() == devices
    assert [(e.path, e.op, e.kwargs) for e in again] == [(e.path, e.op, e.kwargs) for e in p]


def test_everything_fits_and_nothing_fits():
    config = tiny_config("qwen3_moe", num_hidden_layers=3)
    model = meta_model(config)
    dense, experts = _sizes(model)
    roomy = plan_placement(model, config, device=GPU, gpu_memory="1GiB")
    assert roomy.gpu_layers == [0, 1, 2] and roomy.cpu_layers == [] and roomy.cpu_bytes == 0
    only_dense = plan_placement(model, config, device=GPU, gpu_memory=dense)
    assert only_dense.gpu_layers == [] and only_dense.cpu_layers == [0, 1, 2]
    with pytest.raises(PlacementError, match=rf"too small for the dense part.*at least .*\({dense} bytes"):
        plan_placement(model, config, device=GPU, gpu_memory=dense - 1)
    cpu_need = sum(experts.values())  # without a source, CPU bytes are counted at `dtype` too
    with pytest.raises(PlacementError, match=rf"need .*\({cpu_need} bytes\), over the"):
        plan_placement(model, config, device=GPU, gpu_memory=dense, cpu_memory=cpu_need - 1)


def test_int4_weights_fit_more_and_use_the_gpu_operators():
    config = tiny_config("qwen2_moe", num_hidden_layers=4)
    model = meta_model(config)
    dense, experts = _sizes(model)
    budget = dense + experts[0]
    at_dtype = plan_placement(model, config, device=GPU, gpu_memory=budget)
    int4 = plan_placement(model, config, device=GPU, gpu_memory=budget, gpu_weights="int4")
    assert len(int4.gpu_layers) > len(at_dtype.gpu_layers) == 1
    # Every expert matrix here takes the int4 kernel: 5/8 of a byte per weight instead of 2.
    per_layer = sum(p.numel() for p in model.model.layers[0].mlp.experts.parameters()) * 5 // 8
    assert int4.gpu_bytes - int4.dense_bytes == per_layer * len(int4.gpu_layers)
    p = plan(model, load_rules(int4.rules, device=GPU), default_device="cpu", strict=True)
    assert p.entry("model.layers.0.mlp.experts").op == "experts.gpu"
    assert p.entry("lm_head").op == "linear.gpu" and p.entry("model.embed_tokens").device == GPU
    with pytest.raises(PlacementError, match="gpu_weights must be one of dtype, int4"):
        plan_placement(model, config, device=GPU, gpu_memory=budget, gpu_weights="int3")


def test_cpu_bytes_are_the_gguf_stored_bytes(tmp_path):
    from graftlm.weights.convert import convert
    from graftlm.weights.open import open_weights
    from tests.models.tiny import make_model

    make_model("qwen2_moe", tmp_path)
    files = open_weights(convert(tmp_path, tmp_path / "m.gguf", "q8_0"))
    model = files.meta_model
    dense, experts = _sizes(model)
    placement = plan_placement(model, files.config, device=GPU, gpu_memory=dense, source=files.source)
    reader = files.gguf
    want = sum(int(t.n_bytes) for name, t in reader.tensors.items() if "_exps." in name)
    assert placement.cpu_layers == [0, 1] and placement.cpu_bytes == want
    assert want < sum(experts.values())  # Q8_0 is ~1.06 bytes a weight, under bf16's 2


def test_parse_size():
    assert parse_size("12GiB") == 12 * 1024**3
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size(4096) == 4096
    with pytest.raises(PlacementError, match="cannot read '12 parsecs'"):
        parse_size("12 parsecs")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.inject.helpers import random_model
    from tests.models.tiny import make_tokenizer

    path = tmp_path_factory.mktemp("deepseek_v3_placed")
    random_model(tiny_config("deepseek_v3")).save_pretrained(path)
    make_tokenizer(path)  # graftlm.load reads one; the planner's tests do not
    return path


def test_inspect_plans_from_a_budget_and_writes_rules(folder, tmp_path, capsys, monkeypatch):
    import json

    from graftlm.cli import main
    from graftlm.weights import safetensors_source

    def refuse(*args, **kwargs):
        raise AssertionError("the planner read a weight")

    monkeypatch.setattr(safetensors_source.SafetensorsSource, "get", refuse)
    monkeypatch.setattr(safetensors_source.SafetensorsSource, "raw", refuse)
    config = tiny_config("deepseek_v3")
    dense, experts = _sizes(meta_model(config), itemsize=4)
    budget = dense + experts[1]  # layer 0 is dense; room for the experts of layer 1 only
    out = tmp_path / "placed.yaml"
    argv = ["inspect", str(folder), "--gpu-memory", str(budget), "--write-rules", str(out), "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    modules = {m["path"]: m for m in data["modules"]}
    assert modules["model.layers.1.mlp.experts"]["device"] == GPU
    assert modules["model.layers.2.mlp.experts"]["device"] == "cpu"
    assert modules["model.layers.2.mlp.experts"]["op"] == "experts.cpu"
    assert modules["lm_head"]["device"] == GPU and modules["model.layers.2.self_attn"]["device"] == GPU
    assert "on cuda:0 [1], 1 on cpu [2]" in data["placement"] and str(out) in data["placement"]
    assert main(["inspect", str(folder), "--rules", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [(m["path"], m["op"], m["device"]) for m in again["modules"]] == [
        (m["path"], m["op"], m["device"]) for m in data["modules"]
    ]
    # Too small: a one-line error naming the bytes the dense part needs.
    assert main(["inspect", str(folder), "--gpu-memory", str(dense - 1)]) != 0
    assert f"({dense} bytes" in capsys.readouterr().err


def test_load_rejects_conflicting_or_impossible_budgets(folder):
    import graftlm

    with pytest.raises(PlacementError, match="pass rules or a memory budget, not both"):
        graftlm.load(folder, rules="builtin:deepseek2", gpu_memory="1GiB", progress=False)
    with pytest.raises(PlacementError, match="need gpu_memory as well"):
        graftlm.load(folder, cpu_memory="1GiB", progress=False)
    with pytest.raises(PlacementError, match="too small for the dense part"):
        graftlm.load(folder, gpu_memory="1KiB", progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_from_a_budget_runs_on_cuda(folder):
    import graftlm
    from tests.inject.helpers import random_model

    config = tiny_config("deepseek_v3")
    dense, experts = _sizes(meta_model(config), itemsize=4)
    llm = graftlm.load(folder, gpu_memory=dense + experts[1], progress=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        got = llm.model(ids.cuda()).logits.cpu()
        want = random_model(config)(ids).logits
    assert (got - want).abs().max().item() < 1e-3
