"""The `openai` client against a live server: answers equal graftlm's own greedy generation."""

from __future__ import annotations

from typing import Any

import pytest

openai = pytest.importorskip("openai", reason="the OpenAI client tests need `pip install openai`")

from tests.server.conftest import MODEL_NAME, LiveServer  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "The quick brown fox"},
]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Any:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_served_model(client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat_matches_llm_chat(client: Any, reference: Any) -> None:
    expected = reference.chat(MESSAGES, max_new_tokens=20, ignore_eos=True)
    answer = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == expected.prompt_tokens
    assert answer.usage.completion_tokens == len(expected.token_ids) == 20
    assert answer.usage.total_tokens == expected.prompt_tokens + 20


def test_streaming_chat_matches_llm_chat(client: Any, reference: Any) -> None:
    expected = reference.chat(MESSAGES, max_new_tokens=24)  # EOS may end it early: same for both
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert len(content) > 2, "the reply should arrive in several pieces"
    assert "".join(c.choices[0].delta.content or "" for c in content) == expected.text
    assert content[-1].choices[0].finish_reason == (
        "length" if expected.finish_reason == "length" else "stop"
    )
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, len(expected.token_ids))
    assert len({c.id for c in chunks}) == 1


def test_completions_match_llm_generate(client: Any, reference: Any) -> None:
    prompt = "Hello world, hello"
    expected = reference.generate(prompt, max_new_tokens=12, ignore_eos=True)
    answer = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert answer.choices[0].text == expected.text
    assert answer.usage.completion_tokens == 12
    streamed = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_stop_strings_end_the_text(client: Any, reference: Any) -> None:
    full = reference.chat(MESSAGES, max_new_tokens=24, ignore_eos=True).text
    stop = next(full[i : i + 2] for i in range(4, len(full) - 2) if full[i : i + 2].strip())
    expected = reference.chat(MESSAGES, max_new_tokens=24, ignore_eos=True, stop=[stop])
    assert expected.finish_reason == "stop" and stop not in expected.text
    answer = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert answer.choices[0].message.content == expected.text == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_seed_repeats_sampling(client: Any, reference: Any) -> None:
    kwargs = dict(max_new_tokens=16, temperature=1.3, top_p=0.95, seed=7, ignore_eos=True)
    expected = reference.generate("Once upon", **kwargs)
    texts = [
        client.completions.create(
            model=MODEL_NAME,
            prompt="Once upon",
            max_tokens=16,
            temperature=1.3,
            top_p=0.95,
            seed=7,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert texts == [expected.text, expected.text]
    greedy = reference.generate("Once upon", max_new_tokens=16, ignore_eos=True).text
    assert expected.text != greedy, "sampling at temperature 1.3 should differ from greedy"


def test_errors_raise_the_clients_exceptions(client: Any) -> None:
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=100_000)
    answer = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, temperature=0)
    assert answer.usage.completion_tokens >= 1
