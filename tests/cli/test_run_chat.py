"""`graftlm run` and `graftlm chat` end to end, with graftlm.api.load replaced by a tiny model."""

from __future__ import annotations

import importlib
import io
import sys
import types
from pathlib import Path

import pytest
import torch

from graftlm.cli import main
from graftlm.engine.generate import Engine
from tests.engine.helpers import byte_tokenizer, tiny_llama
from tests.models.tiny import make_model

torch.set_num_threads(1)


class FakeLLM:
    """What graftlm.load returns, as far as the CLI uses it; it records the prompts it is given."""

    def __init__(self) -> None:
        self.tokenizer = byte_tokenizer()
        self.model = tiny_llama(len(self.tokenizer))
        self.config = self.model.config
        self.engine = Engine(self.model, self.tokenizer)
        self.prompts: list[list[int]] = []
        generate = self.engine.generate

        def recording_generate(prompt, *args, **kwargs):
            self.prompts.append(self.engine.encode(prompt))
            return generate(prompt, *args, **kwargs)

        self.engine.generate = recording_generate
        self.reference = Engine(self.model, self.tokenizer)  # an untouched engine to compute expectations

    def generate(self, prompt, **kwargs):
        return self.engine.generate(prompt, **kwargs)


@pytest.fixture
def fake_load(monkeypatch):
    """Substitute graftlm.api.load (a stand-in module until graftlm/api.py exists)."""
    llm = FakeLLM()
    calls: list[tuple] = []

    def load(path, *, rules=None, device="cpu"):
        calls.append((Path(path), rules, device))
        return llm

    try:
        api = importlib.import_module("graftlm.api")
        monkeypatch.setattr(api, "load", load)
    except ModuleNotFoundError:
        monkeypatch.setitem(sys.modules, "graftlm.api", types.SimpleNamespace(load=load))
    # Runs without a MODEL load the demo model: stand in for its path, so these tests need no demo extra.
    monkeypatch.setattr("graftlm.models.demo.demo_model_path", lambda: Path("demo.gguf"))
    llm.load_calls = calls
    return llm


def test_run_streams_the_continuation_and_a_summary(fake_load, capsys):
    rc = main(
        ["run", "model.gguf", "--prompt", "Once upon a time", "--max-new-tokens", "12", "--ignore-eos"]
        + ["--rules", "r.yaml", "--threads", "1"]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    assert fake_load.load_calls == [(Path("model.gguf"), "r.yaml", "cpu")]
    expected = fake_load.reference.generate("Once upon a time", max_new_tokens=12, ignore_eos=True)
    assert out == expected.text + "\n"
    assert f"prompt {expected.prompt_tokens} tokens, generated 12 tokens (length)" in err
    assert "prefill" in err and "decode" in err and "tok/s" in err


def test_run_without_model_uses_the_demo_model_and_default_prompt(fake_load, monkeypatch, capsys):
    monkeypatch.setattr("graftlm.models.demo.demo_model_path", lambda: Path("/demo/gemma.gguf"))
    rc = main(
        ["run", "--max-new-tokens", "4", "--threads", "1", "--echo", "--temperature", "0.9", "--seed", "3"]
    )
    out, _ = capsys.readouterr()
    assert rc == 0
    assert fake_load.load_calls[0][0] == Path("/demo/gemma.gguf")
    assert fake_load.prompts == [fake_load.engine.encode("The capital of France is")]
    expected = fake_load.reference.generate(
        "The capital of France is", max_new_tokens=4, temperature=0.9, seed=3
    )
    assert out == "The capital of France is" + expected.text + "\n"


def test_run_bad_sampling_flag_is_a_clean_error(fake_load, capsys):
    rc = main(["run", "--top-p", "0", "--threads", "1"])
    assert rc == 2
    assert "top_p" in capsys.readouterr().err


def chat_prompt(tok, *turns: tuple[str, str]) -> list[int]:
    return tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in turns],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def test_chat_multi_turn_reset_and_exit(fake_load, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhow are you\n/reset\nbye\n/exit\nnever read\n"))
    rc = main(["chat", "--max-new-tokens", "6", "--ignore-eos", "--threads", "1", "--system", "Be brief."])
    out, err = capsys.readouterr()
    assert rc == 0
    tok, ref = fake_load.tokenizer, fake_load.reference
    first = ref.generate(
        chat_prompt(tok, ("system", "Be brief."), ("user", "hello")), max_new_tokens=6, ignore_eos=True
    )
    second_prompt = chat_prompt(
        tok, ("system", "Be brief."), ("user", "hello"), ("assistant", first.text), ("user", "how are you")
    )
    second = ref.generate(second_prompt, max_new_tokens=6, ignore_eos=True)
    after_reset = chat_prompt(tok, ("system", "Be brief."), ("user", "bye"))
    third = ref.generate(after_reset, max_new_tokens=6, ignore_eos=True)
    # Each turn sees the whole history; /reset keeps only the system prompt; /exit stops reading.
    assert fake_load.prompts == [
        chat_prompt(tok, ("system", "Be brief."), ("user", "hello")),
        second_prompt,
        after_reset,
    ]
    assert out == f"{first.text}\n{second.text}\n{third.text}\n"
    assert "cleared" in err


def test_chat_ends_at_end_of_input(fake_load, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n"))
    assert main(["chat", "--max-new-tokens", "3", "--threads", "1"]) == 0
    assert len(fake_load.prompts) == 1


def test_chat_without_template_is_a_clean_error(fake_load, monkeypatch, capsys):
    fake_load.tokenizer.chat_template = None
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "--threads", "1"]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert fake_load.prompts == []


def test_chat_template_from_a_file(fake_load, monkeypatch, capsys, tmp_path):
    fake_load.tokenizer.chat_template = None
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "--threads", "1", "--max-new-tokens", "2", "--chat-template", str(template)]) == 0
    assert fake_load.tokenizer.decode(fake_load.prompts[0]) == "hello|"


def test_negative_threads_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--threads", "-3"])
    assert exit_.value.code == 2
    assert "--threads: must be >= 0" in capsys.readouterr().err


def test_convert_into_a_missing_folder_is_a_clean_error(tmp_path, capsys):
    make_model("llama", tmp_path / "hf")
    rc = main(["convert", str(tmp_path / "hf"), str(tmp_path / "no" / "such" / "dir" / "x.gguf")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "x.gguf: cannot write the GGUF file (No such file or directory)" in err and "Traceback" not in err
