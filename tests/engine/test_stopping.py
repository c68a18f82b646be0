"""Stopping and streaming with a scripted model whose output is known token by token."""

from __future__ import annotations

import pytest
import torch

from graftlm.engine.generate import Engine
from tests.engine.helpers import EOS, ScriptedLM, byte_tokenizer, sentencepiece_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def scripted(tok, prompt: str, continuation: str, *, extra: list[int] = (), **engine_kw):
    prompt_ids = tok.encode(prompt)
    script = tok.encode(continuation, add_special_tokens=False) + list(extra)
    model = ScriptedLM(script, len(prompt_ids), vocab_size=len(tok))
    return Engine(model, tok, **engine_kw), prompt_ids, script


def run_streaming(engine, prompt, **kw):
    pieces: list[str] = []
    result = engine.generate(prompt, on_text=pieces.append, **kw)
    return result, pieces


def test_stops_on_eos_and_keeps_its_id(tok):
    engine, prompt, script = scripted(tok, "hello", " world", extra=[EOS, 5, 6])
    result, pieces = run_streaming(engine, prompt, max_new_tokens=50)
    assert result.finish_reason == "stop"
    assert result.text == " world"
    assert result.token_ids == script[: script.index(EOS) + 1]
    assert "".join(pieces) == result.text


def test_ignore_eos_runs_to_the_length_limit(tok):
    engine, prompt, script = scripted(tok, "hello", " world", extra=[EOS])
    result = engine.generate(prompt, max_new_tokens=len(script) + 3, ignore_eos=True)
    assert result.finish_reason == "length"
    assert len(result.token_ids) == len(script) + 3


def test_explicit_stop_token_ids_replace_eos(tok):
    engine, prompt, script = scripted(tok, "hello", " the quick brown fox", extra=[EOS])
    result = engine.generate(prompt, max_new_tokens=50, stop_token_ids=[script[2]])
    assert result.finish_reason == "stop"
    assert result.token_ids == script[:3]


def test_stop_string_spanning_tokens_is_cut_from_text_and_stream(tok):
    text = " The capital of France is Paris.\nUser: next question"
    engine, prompt, script = scripted(tok, "Q:", text)
    result, pieces = run_streaming(engine, prompt, max_new_tokens=100, stop=["\nUser:"])
    assert result.finish_reason == "stop"
    assert result.text == " The capital of France is Paris."
    assert "".join(pieces) == result.text
    # The ids run up to the token that completed the stop string, not beyond.
    done = tok.decode(result.token_ids)
    assert done.startswith(text[: text.index("\nUser:") + len("\nUser:")])
    assert not tok.decode(result.token_ids[:-1]).endswith("\nUser:")
    assert len(engine.model.calls) == len(result.token_ids)  # prefill + one step per token but the last


def test_unfinished_stop_prefix_is_released_at_the_end(tok):
    engine, prompt, script = scripted(tok, "Q:", " Paris\nUs")
    result, pieces = run_streaming(engine, prompt, max_new_tokens=len(script), stop=["\nUser:"])
    assert result.finish_reason == "length"
    assert result.text == " Paris\nUs" == "".join(pieces)
    assert not pieces[-2].endswith("\n")  # the possible stop prefix was held back until the end


def test_should_stop_cancels(tok):
    engine, prompt, script = scripted(tok, "hello", " the quick brown fox jumps over the lazy dog")
    polls = iter(range(100))
    result = engine.generate(prompt, max_new_tokens=50, should_stop=lambda: next(polls) >= 4)
    assert result.finish_reason == "cancelled"
    # Polled once in prefill (one chunk), then before each token: 3 tokens before the 5th poll.
    assert result.token_ids == script[:3]
    assert result.text == tok.decode(script[:3])


def test_should_stop_during_prefill(tok):
    engine, prompt, script = scripted(tok, "hello there, the quick brown fox", " dog", prefill_chunk=2)
    polls = iter(range(100))
    result = engine.generate(prompt, max_new_tokens=5, should_stop=lambda: next(polls) >= 2)
    assert (result.finish_reason, result.token_ids, result.text) == ("cancelled", [], "")
    assert engine.model.calls == [2, 2]


def test_multibyte_characters_stream_whole(tok):
    text = " café crème 🙂 日本語!"
    engine, prompt, script = scripted(tok, "hello", text, extra=[EOS])
    assert len(script) > len(text) + 1  # several characters are split over byte tokens
    result, pieces = run_streaming(engine, prompt, max_new_tokens=100)
    assert result.text == text == "".join(pieces)
    assert not any("\ufffd" in p for p in pieces)


def test_stream_matches_generate_with_stop_strings(tok):
    engine, prompt, _ = scripted(tok, "hello", " 🙂 the END of the world")
    result = engine.generate(prompt, max_new_tokens=100, stop=["END"])
    pieces = list(engine.stream(prompt, max_new_tokens=100, stop=["END"]))
    assert "".join(pieces) == result.text == " 🙂 the "


def test_sentencepiece_first_token_keeps_its_space():
    tok = sentencepiece_tokenizer()
    engine, prompt, _ = scripted(tok, "The capital of France is", "Paris .", extra=[EOS])
    result, pieces = run_streaming(engine, prompt, max_new_tokens=10)
    assert result.text == " Paris ." == "".join(pieces)
    assert result.finish_reason == "stop"


def test_uses_the_models_own_cache_and_positions(tok):
    engine, prompt, script = scripted(tok, "hello there, the quick brown fox", " dog", prefill_chunk=4)
    engine.generate(prompt, max_new_tokens=3, ignore_eos=True)
    # ScriptedLM asserts positions continue its make_cache() cache; chunks of 4, then 1 per step.
    n = len(prompt)
    assert engine.model.calls == [4] * (n // 4) + ([n % 4] if n % 4 else []) + [1, 1]


def test_zero_new_tokens_runs_nothing(tok):
    engine, prompt, _ = scripted(tok, "hello", " world")
    result = engine.generate(prompt, max_new_tokens=0)
    assert (result.token_ids, result.text, result.finish_reason) == ([], "", "length")
    assert engine.model.calls == []


def test_chat_end_of_turn_tokens_stop_by_default(tok):
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    engine, prompt, script = scripted(tok, "hello", " world", extra=[im_end, 5])
    assert engine.eos_token_ids == [EOS, im_end]
    result = engine.generate(prompt, max_new_tokens=20)
    assert (result.text, result.finish_reason, result.token_ids[-1]) == (" world", "stop", im_end)
