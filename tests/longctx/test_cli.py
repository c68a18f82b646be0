"""`graftlm eval-long` end to end on a tiny random-weight GGUF (512 positions): a random model
scores about 0, so these check the table, the JSON and that two runs predict the same."""

from __future__ import annotations

import json
import re

import pytest
import torch

from graftlm.api import LLM
from graftlm.cli import main
from graftlm.weights.convert import convert
from tests.engine.helpers import byte_tokenizer, tiny_llama
from tests.longctx.helpers import sparse_module

torch.set_num_threads(1)
LENGTHS = {"passkey": 256, "number_string": 256, "kv_retrieval": 448, "niah": 400}


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    """A random 2-layer Llama with 512 positions and a byte-level BPE without a chat template.
    (tests.models.tiny's builders would do, but importing every architecture they cover costs seconds.)"""
    folder = tmp_path_factory.mktemp("tiny")
    tok = byte_tokenizer()
    tok.chat_template = None
    tiny_llama(len(tok), max_positions=512).save_pretrained(folder / "hf")
    tok.save_pretrained(folder / "hf")
    return convert(folder / "hf", folder / "llama-f32.gguf", "f32")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["eval-long", *argv, "--threads", "1"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("task", list(LENGTHS))
def test_each_task_dense_table_json_and_determinism(gguf, tmp_path, capsys, task):
    length = LENGTHS[task]
    args = [str(gguf), "--task", task, "--length", str(length), "--samples", "3", "--depths", "0,0.5,0.9"]
    args += ["--setting", "dense=enabled=false", "--by-depth"]
    rc, out, err = run(capsys, *args, "--json", str(tmp_path / "a.json"))
    assert rc == 0, err
    assert out.startswith(f"{task}: 3 samples per length (seed 0), raw prompts, greedy")
    header, row = out.splitlines()[1:3]
    assert header.split()[:2] == ["setting", str(length)] and "prefill tok/s" in header
    assert row.split()[0] == "dense" and float(row.split()[1]) >= 0.0
    assert "accuracy by depth (%)" in out

    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["task"] == task and doc["lengths"] == [length] and doc["depths"] == [0.0, 0.5, 0.9]
    (setting,) = doc["settings"]
    assert setting["name"] == "dense" and set(setting["accuracy"]) == {str(length)}
    samples = setting["samples"]
    assert [s["depth"] for s in samples] == [0.0, 0.5, 0.9]
    for s in samples:
        assert s["length"] == length and s["prompt_tokens"] <= length
        assert s["answers"] and isinstance(s["prediction"], str) and s["score"] in (0.0, 1.0)

    assert run(capsys, *args, "--json", str(tmp_path / "b.json"))[0] == 0
    again = json.loads((tmp_path / "b.json").read_text())["settings"][0]["samples"]
    assert [(s["answers"], s["prediction"]) for s in again] == [
        (s["answers"], s["prediction"]) for s in samples
    ]


def test_default_settings_dense_and_sparse(gguf, tmp_path, capsys):
    sparse_module()
    rc, out, err = run(capsys, str(gguf), "--task", "passkey", "--length", "400", "--samples", "2", "--json",
                       str(tmp_path / "r.json"))  # fmt: skip
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[2:4]]
    assert [r[0] for r in rows] == ["dense", "sparse-1/8"]
    assert rows[0][-1] == "-" and float(rows[1][-1]) > 0  # the share of keys sparse decode read
    assert "sparse-1/8: block_size=16,local_window=16,topk=1" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [s["name"] for s in doc["settings"]] == ["dense", "sparse-1/8"]
    assert all(len(s["samples"]) == 2 for s in doc["settings"])


def test_ladder_and_the_sparse_flag(gguf, capsys):
    sparse_module()
    rc, out, err = run(capsys, str(gguf), "--task", "niah", "--length", "300", "--samples", "1", "--ladder",
                       "--sparse", "topk=2,block_size=16,local_window=32")  # fmt: skip
    assert rc == 0, err
    names = [line.split()[0] for line in out.splitlines()[2:7]]
    assert names == ["dense", "sparse", "sparse+preselect", "sparse+preselect+dense1", "--sparse"]


def test_chat_template_is_used_unless_no_chat(monkeypatch, capsys):
    tok = byte_tokenizer()
    model = tiny_llama(len(tok), max_positions=1024)
    llm = LLM(model, tok, model.config)
    monkeypatch.setattr("graftlm.api.load", lambda path, **kwargs: llm)
    base = ["model.gguf", "--task", "number_string", "--length", "300", "--samples", "1"]
    base += ["--setting", "dense=enabled=false"]
    rc, out, err = run(capsys, *base)
    assert rc == 0, err
    assert "chat template" in out.splitlines()[0]
    rc, out, _ = run(capsys, *base, "--no-chat", "--max-new-tokens", "3")
    assert "raw prompts, greedy, 3 new tokens at most" in out.splitlines()[0]


DENSE = ["--setting", "d=enabled=false"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--length", "40", *DENSE], "too small for passkey: .* at least"),
        (["--length", "1024", *DENSE], r"longer than the model's context \(512 tokens"),
        (["--depths", "0.5,2", *DENSE], "--depths must be fractions in 0..1"),
        (["--length", "x", *DENSE], "--length takes whole numbers"),
        (["--setting", "a=enabled=false", "--setting", "a=enabled=0"], "distinct names"),
    ],
)
def test_errors_are_clean(gguf, capsys, argv, message):
    rc, _, err = run(capsys, str(gguf), "--task", "passkey", *argv)
    assert rc == 2
    assert err.startswith("graftlm: error: ")
    assert re.search(message, err), err


def test_unknown_task_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval-long", "--task", "pass_key"])
    assert info.value.code == 2
    assert "invalid choice: 'pass_key'" in capsys.readouterr().err
