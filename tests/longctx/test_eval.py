"""Settings (named, parsed, sized to a KV budget), the run loop and the table."""

from __future__ import annotations

import pytest
import torch

from graftlm.api import LLM
from graftlm.errors import GraftError
from graftlm.longctx import eval as longeval
from graftlm.longctx.eval import Setting, evaluate, format_table, parse_setting, prompt_budget
from graftlm.longctx.tasks import build_samples
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
