"""Settings (named, parsed, sized to a KV budget), the run loop and the table."""

from __future__ import annotations

import pytest
import torch

from graftlm.api import LLM
from graftlm.errors import GraftError
from graftlm.inject import apply, load_rules, plan
from graftlm.longctx import eval as longeval
from graftlm.longctx.eval import Setting, evaluate, format_table, parse_setting, prompt_budget
from graftlm.longctx.tasks import build_samples
from graftlm.models.build import build_meta_model
from graftlm.weights.memory import StateDictSource
from tests.engine.helpers import byte_tokenizer, tiny_llama
from tests.longctx.helpers import chat_format, sparse_module

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dense_llm():
    tok = byte_tokenizer()
    model = tiny_llama(len(tok), max_positions=1024)
    return LLM(model, tok, model.config)


def test_dense_setting_runs_without_the_sparse_operator(dense_llm):
    samples = build_samples("passkey", chat_format(dense_llm.tokenizer), [300, 600], (0.2, 0.7), seed=2)
    seen = []
    reports = evaluate(dense_llm, samples, [Setting("dense", "enabled=false")], 6, on_result=seen.append)
    (report,) = reports
    assert len(report.results) == len(seen) == 4
    assert [(r.length, r.depth) for r in report.results] == [(300, 0.2), (300, 0.7), (600, 0.2), (600, 0.7)]
    for r, s in zip(report.results, samples):
        assert r.prompt_tokens == len(s.ids) and r.answers == s.answers and r.score in (0.0, 1.0)
        assert 1 <= r.generated_tokens <= 6
    assert report.accuracy(300) is not None and report.accuracy(999) is None
    assert report.prefill_tok_s > 0 and report.kv_read is None
    assert report.sparse == {
        300: "dense attention (the model's own)",
        600: "dense attention (the model's own)",
    }
    again = evaluate(dense_llm, samples, [Setting("dense", "enabled=false")], 6)
    assert [r.prediction for r in again[0].results] == [r.prediction for r in report.results]

    table = format_table(reports, [300, 600], by_depth=True)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["setting", "300", "600"] and "decode tok/s" in lines[0]
    assert lines[1].startswith("dense ")
    assert "accuracy by depth (%)" in table and "0.70" in table

    with pytest.raises(GraftError, match="'s8' needs block-sparse attention"):
        evaluate(dense_llm, samples, [Setting("s8", "topk=8")], 6)


def test_prompt_budget_leaves_room_for_the_answer():
    assert prompt_budget(4096, 32768, 16) == 4096
    assert prompt_budget(4096, 4096, 16) == 4080
    assert prompt_budget(4096, None, 16) == 4096
    with pytest.raises(GraftError, match=r"longer than the model's context \(2048 tokens"):
        prompt_budget(4096, 2048, 16)


def test_parse_setting_names_and_dense():
    assert parse_setting("dense=enabled=false").dense
    assert parse_setting("d=enabled=Off").dense
    assert not parse_setting("s=topk=8").dense
    assert parse_setting("b=budget=4,preselect=true") == Setting("b", "preselect=true", 4)
    with pytest.raises(GraftError, match="give it a name"):
        parse_setting("=topk=8")
    with pytest.raises(GraftError, match="budget takes a whole fraction"):
        parse_setting("b=budget=x")


def test_sparse_settings_parse_and_budget():
    sparse = sparse_module()
    s = parse_setting("t8=topk=8,anchor_type=max").resolve(4096)
    assert (s.topk, s.anchor_type, s.block_size) == (8, "max", 128)
    with pytest.raises(GraftError, match="'bad'.*topk_x"):
        parse_setting("bad=topk_x=8")
    for length in (4096, 32768, 131072):
        b = longeval.budget_settings(length, 8, sparse.SparseSettings())
        kept = b.initial_blocks * b.block_size + b.local_window + b.topk * b.block_size
        assert length / 8 - b.block_size < kept <= length / 8, (length, b)
    small = longeval.budget_settings(512, 8, sparse.SparseSettings())
    assert small.block_size == 16 and small.topk >= 1
    ladder = longeval.ladder_settings()
    assert [x.name for x in ladder] == ["dense", "sparse", "sparse+preselect", "sparse+preselect+dense1"]
    top = ladder[-1].resolve(4096)
    assert top.preselect and top.dense_layers == 1 and top.topk == ladder[1].resolve(4096).topk
    assert ladder[0].describe(4096) == "dense attention"
    assert ladder[2].describe(4096) == "local_window=128,topk=2,preselect=True"
    assert [x.name for x in longeval.default_settings()] == ["dense", "sparse-1/8"]


@pytest.mark.parametrize("last_chunk", ["long", "one token"])
def test_shared_prefill_matches_separate_runs(monkeypatch, last_chunk):
    """Settings sharing a prompt pass decode from copies of one cache: every prediction and
    read-key count equals that setting run alone, with one prefill per sample and cache layout,
    also when the prompt's chunks would leave its last token alone (a decode-shaped call)."""
    sparse = sparse_module()
    tok = byte_tokenizer()
    hf = tiny_llama(len(tok), max_positions=1024)
    meta = build_meta_model(hf.config)
    rules = plan(meta, load_rules(sparse.sparse_rules("block_size=16")))
    model = apply(meta, rules, source=StateDictSource(hf.state_dict()), config=hf.config)
    llm = LLM(model, tok, model.config)
    settings = [
        Setting("dense", "enabled=false"),
        Setting("quest", "block_size=16,local_window=32,topk=2"),
        Setting("max", "block_size=16,local_window=32,topk=3,anchor_type=max,head_select=per_head"),
        Setting("pre", "block_size=16,local_window=32,topk=2,preselect=true,preselect_blocks=4"),
        Setting("b32", "block_size=32,local_window=32,topk=1"),
        Setting("dense-bf16", "enabled=false,kv_dtype=bfloat16"),
    ]
    resolved = {s.name: s.resolve(700) for s in settings}
    groups = longeval._prefill_groups(settings, resolved)
    assert [[s.name for s in g] for g in groups] == [
        ["quest", "max", "pre", "dense"],
        ["b32"],
        ["dense-bf16"],
    ]

    samples = build_samples("passkey", chat_format(tok), [700], (0.3, 0.8), seed=5)
    if last_chunk == "one token":
        llm.engine.prefill_chunk = len(samples[0].ids) - 1
    prefills = []
    real = llm.engine.prefill
    monkeypatch.setattr(llm.engine, "prefill", lambda ids, **kw: prefills.append(len(ids)) or real(ids, **kw))
    together = evaluate(llm, samples, settings, 8)
    assert len(prefills) == len(samples) * len(groups)
    for s, report in zip(settings, together):
        (alone,) = evaluate(llm, samples, [s], 8)
        assert [r.prediction for r in report.results] == [r.prediction for r in alone.results], s.name
        assert (report.attended, report.context) == (alone.attended, alone.context), s.name
        assert all(r.prefill_seconds > 0 for r in report.results)
    assert together[0].kv_read is None and together[1].kv_read < 100
