"""The engine on a tiny random Llama: agreement with transformers, cache use, chunked prefill, seeds."""

from __future__ import annotations

import pytest
import torch

from graftlm.engine.generate import ContextOverflowError, Engine, prefill_chunks
from graftlm.engine.sampling import SamplingParams
from graftlm.errors import GraftError
from tests.engine.helpers import byte_tokenizer, tiny_llama

torch.set_num_threads(1)

PROMPT = "Once upon a time there was a little model"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok))


@pytest.fixture
def engine(model, tok):
    return Engine(model, tok)


def test_greedy_matches_transformers_generate(engine, model, tok):
    ids = engine.encode(PROMPT)
    assert ids[0] == tok.bos_token_id
    expected = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=16,
        min_new_tokens=16,
    )[0, len(ids) :].tolist()
    result = engine.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    assert result.token_ids == expected
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(ids)
    assert result.prefill_seconds > 0 and result.decode_seconds > 0


def test_prompt_runs_once_then_one_token_per_step(engine, model):
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda _m, _args, kwargs: sizes.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        result = engine.generate(PROMPT, max_new_tokens=10, ignore_eos=True)
    finally:
        handle.remove()
    assert len(result.token_ids) == 10
    # The 10th token comes from the 9th decode step's logits: no forward after the last token.
    assert sizes == [len(engine.encode(PROMPT))] + [1] * 9


def test_chunked_prefill_gives_the_same_logits_and_tokens(model, tok):
    one_shot = Engine(model, tok, prefill_chunk=512)
    chunked = Engine(model, tok, prefill_chunk=3)
    ids = one_shot.encode(PROMPT)
    assert len(ids) > 3 * 2
    logits_a, _ = one_shot.prefill(ids)
    logits_b, _ = chunked.prefill(ids)
    assert logits_a.shape == (1, len(tok))
    torch.testing.assert_close(logits_b, logits_a, atol=1e-5, rtol=1e-5)
    # ... and the last-position logits equal a plain full forward pass without a cache.
    full = model(input_ids=torch.tensor([ids])).logits[:, -1]
    torch.testing.assert_close(logits_a, full, atol=1e-5, rtol=1e-5)
    a = one_shot.generate(ids, max_new_tokens=8, ignore_eos=True)
    b = chunked.generate(ids, max_new_tokens=8, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_seeded_sampling_repeats_and_seeds_differ(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=11, ignore_eos=True)
    first = engine.generate(PROMPT, params)
    assert engine.generate(PROMPT, params).token_ids == first.token_ids
    other = engine.generate(PROMPT, params, seed=12)
    assert other.token_ids != first.token_ids


def test_top_k_one_equals_greedy(engine):
    greedy = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    top1 = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True, temperature=1.5, top_k=1, seed=5)
    assert top1.token_ids == greedy.token_ids


def test_stream_concatenates_to_generate_text(engine):
    result = engine.generate(PROMPT, max_new_tokens=20, ignore_eos=True)
    pieces = list(engine.stream(PROMPT, max_new_tokens=20, ignore_eos=True))
    assert "".join(pieces) == result.text
    assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_encode_chat_uses_the_template(engine, tok):
    ids = engine.encode_chat([{"role": "user", "content": "hello"}])
    assert tok.decode(ids) == "<bos>user: hello\nassistant:"


def test_encode_chat_without_template_is_a_graft_error(model):
    tok = byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(GraftError, match="no chat template"):
        Engine(model, tok).encode_chat([{"role": "user", "content": "hi"}])


def test_context_overflow_clamps_or_errors(model, tok, caplog):
    engine = Engine(model, tok, max_context=20)
    ids = engine.encode(PROMPT)[:15]
    result = engine.generate(ids, max_new_tokens=50, ignore_eos=True)
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    assert "exceeds the context (20)" in caplog.text
    with pytest.raises(ContextOverflowError, match="20 tokens .* holds 20"):
        engine.generate(engine.encode(PROMPT)[:1] * 20)


def test_max_context_defaults_to_the_config(engine, model):
    assert engine.max_context == model.config.max_position_embeddings


def test_unknown_override_is_a_type_error(engine):
    with pytest.raises(TypeError, match="max_tokens"):
        engine.generate(PROMPT, max_tokens=3)


def test_out_of_vocabulary_id_is_a_graft_error(engine, tok):
    with pytest.raises(GraftError, match="outside the vocabulary"):
        engine.generate([1, len(tok) + 5])


def test_generation_continues_from_a_prefilled_cache(engine):
    import copy

    ids = engine.encode(PROMPT)
    expected = engine.generate(ids, max_new_tokens=12, ignore_eos=True)
    logits, cache = engine.prefill(ids)
    snapshot = copy.deepcopy(cache)
    for _ in range(2):  # the same prefill serves twice, through copies of its cache
        result = engine.generate(
            ids, max_new_tokens=12, ignore_eos=True, prefilled=(logits, copy.deepcopy(snapshot))
        )
        assert result.token_ids == expected.token_ids and result.prefill_seconds < expected.prefill_seconds


def test_prefill_chunks_never_end_with_a_lone_token():
    assert prefill_chunks(1024, 512) == [(0, 512), (512, 1024)]
    assert prefill_chunks(1025, 512) == [(0, 512), (512, 1025)]
    assert prefill_chunks(513, 512) == [(0, 513)]
    assert prefill_chunks(700, 512) == [(0, 512), (512, 700)]
    assert prefill_chunks(1, 512) == [(0, 1)]
    assert prefill_chunks(0, 512) == []
    assert prefill_chunks(7, 3) == [(0, 3), (3, 7)]
