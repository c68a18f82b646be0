"""`graftlm bench` on a tiny quantized model: every reported figure present and consistent."""

from __future__ import annotations

import json

import pytest
import torch

from graftlm.cli import main
from graftlm.engine.bench import weight_bytes_by_device, weight_bytes_per_token
from graftlm.weights.convert import convert
from tests.models.tiny import make_model


def test_bench_json(tmp_path, capsys):
    torch.set_num_threads(1)
    make_model("qwen2_moe", tmp_path)
    path = convert(tmp_path, tmp_path / "q4_0.gguf", "q4_0")
    code = main(["bench", str(path), "--rules", "auto", "--threads", "1", "--prompt-tokens", "24",
                 "--gen-tokens", "6", "--repeat", "2", "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    r = json.loads(out[out.index("{") :])
    assert r["threads"] == 1 and r["repeat"] == 2 and len(r["decode_runs"]) == 2
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_mib"] > 0
    assert r["decode_gb_s"] == r["bytes_per_token"] * r["decode_tok_s"] / 1e9
    assert r["bytes_by_device"] == {"cpu": r["bytes_per_token"]} and r["peak_gpu_mib"] == []
    assert r["machine"] and r["generated_tokens"] == r["gen_tokens"] == 6


def test_bench_near_the_context_end_reports_what_it_generated(tmp_path, capsys):
    torch.set_num_threads(1)
    make_model("llama", tmp_path)  # a context of 256
    path = convert(tmp_path, tmp_path / "f32.gguf", "f32")
    base = ["bench", str(path), "--threads", "1", "--repeat", "1", "--gen-tokens", "20"]
    assert main([*base, "--prompt-tokens", "250"]) == 0
    assert "(6 tokens of the 20 asked: the context ends;" in capsys.readouterr().out
    assert main([*base, "--prompt-tokens", "255"]) == 2  # one token: nothing to time
    assert "no decode step to time" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [("--gen-tokens", "1"), ("--repeat", "0"), ("--prompt-tokens", "-5")])
def test_bench_refuses_counts_it_cannot_measure(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "model.gguf", *flag])
    assert exit_.value.code == 2 and f"argument {flag[0]}: must be >=" in capsys.readouterr().err


def test_bytes_per_token_counts_active_experts_and_one_embedding_row(tmp_path):
    import graftlm
    from graftlm.ops.experts_cpu import ExpertsCPU

    make_model("qwen2_moe", tmp_path)  # 4 experts, 2 active
    llm = graftlm.load(convert(tmp_path, tmp_path / "q4_0.gguf", "q4_0"), rules="auto", progress=False)
    model, config = llm.model, llm.model.config
    sizes = [sum(p.nbytes for p in m.gate_up + m.down) for m in model.modules() if isinstance(m, ExpertsCPU)]
    assert sizes and config.num_experts == 4
    config.num_experts_per_tok = 4
    every_expert = weight_bytes_per_token(model)
    config.num_experts_per_tok = 1
    one_expert = weight_bytes_per_token(model)
    assert every_expert - one_expert == sum(s - s // 4 for s in sizes)
    # An embedding table is read one row per token; a linear layer entirely.
    table = torch.nn.Sequential(torch.nn.Embedding(1000, 8), torch.nn.Linear(8, 3, bias=False))
    assert weight_bytes_per_token(table) == 8 * 4 + 8 * 3 * 4


def test_bytes_by_device_follow_each_weight():
    """A packed matrix counts on its weight's device (GPU layouts), plain tensors on theirs."""
    from types import SimpleNamespace

    gpu_like = torch.nn.Module()  # a linear.gpu stand-in: its packed weight on another device
    gpu_like.packed = SimpleNamespace(weight=torch.empty(4, 8, device="meta"), nbytes=48)
    cpu_packed = torch.nn.Module()  # linear.cpu keeps blocks without a `weight` tensor
    cpu_packed.packed = SimpleNamespace(nbytes=20)
    model = torch.nn.Sequential(torch.nn.Linear(8, 3, bias=False), gpu_like, cpu_packed)
    assert weight_bytes_by_device(model) == {"cpu": 8 * 3 * 4 + 20, "meta": 48}
    assert weight_bytes_per_token(model) == 8 * 3 * 4 + 20 + 48
