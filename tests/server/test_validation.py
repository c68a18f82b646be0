"""Bad requests get a 4xx answer with a message, and the server goes on serving."""

from __future__ import annotations

import json
from typing import Any

import pytest

httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

from tests.server.conftest import MAX_BODY_BYTES, MODEL_NAME, LiveServer  # noqa: E402

USER = [{"role": "user", "content": "Hello"}]
CHAT = "/v1/chat/completions"


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL_NAME, "messages": USER, **fields}).encode()


BAD_REQUESTS = {
    # name: (method, path, body, status, part of the message)
    "malformed JSON": ("POST", CHAT, b'{"model": "tiny", "messages": [', 400, "malformed JSON"),
    "malformed JSON (Ollama)": ("POST", "/api/chat", b'{"model": tiny}', 400, "malformed JSON"),
    "not an object": ("POST", CHAT, b"[1, 2]", 400, "must be a JSON object"),
    "empty body": ("POST", CHAT, b"", 400, "body is empty"),
    "unknown model": ("POST", CHAT, chat(model="gpt-4o"), 404, "model 'gpt-4o' not found"),
    "unknown model (completions)": (
        "POST",
        "/v1/completions",
        b'{"model": "x", "prompt": "a"}',
        404,
        "not found",
    ),
    "unknown model (Ollama)": ("POST", "/api/generate", b'{"model": "x", "prompt": "a"}', 404, "not found"),
    "max_tokens above the context": (
        "POST",
        CHAT,
        chat(max_tokens=1000),
        400,
        "the context holds 256 tokens",
    ),
    "num_predict above the context": (
        "POST",
        "/api/chat",
        json.dumps({"model": MODEL_NAME, "messages": USER, "options": {"num_predict": 999}}).encode(),
        400,
        "the context holds 256",
    ),
    "prompt longer than the context": (
        "POST",
        "/v1/completions",
        json.dumps({"model": MODEL_NAME, "prompt": "fox " * 400}).encode(),
        400,
        "shorten the prompt",
    ),
    "negative max_tokens": ("POST", CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    "no messages": ("POST", CHAT, b'{"model": "tiny"}', 400, "messages: Field required"),
    "bad role": ("POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
    "bad temperature": ("POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    "top_p out of range": ("POST", CHAT, chat(top_p=0), 400, "top_p"),
    "several choices": ("POST", CHAT, chat(n=2), 400, "n:"),
    "empty stop string": ("POST", CHAT, chat(stop=[""]), 400, "stop strings must be non-empty"),
    "penalty": ("POST", CHAT, chat(presence_penalty=0.5), 400, "penalties are not implemented"),
    "seed beyond torch's generator": ("POST", CHAT, chat(seed=10**23), 400, "seed"),
    "seed beyond torch's generator (Ollama)": (
        "POST",
        "/api/chat",
        json.dumps({"model": MODEL_NAME, "messages": USER, "options": {"seed": 10**23}}).encode(),
        400,
        "seed",
    ),
    "max_tokens as a boolean": ("POST", CHAT, chat(max_tokens=True), 400, "max_tokens"),
    "max_tokens as a string": ("POST", CHAT, chat(max_tokens="5"), 400, "max_tokens"),
    "NaN temperature": (
        "POST",
        CHAT,
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        400,
        "finite",
    ),
    "logit_bias": ("POST", CHAT, chat(logit_bias={"5": 10}), 400, "logit_bias is not implemented"),
    "top_logprobs": ("POST", CHAT, chat(top_logprobs=3), 400, "top_logprobs"),
    "best_of": ("POST", "/v1/completions", b'{"prompt": "a", "best_of": 2}', 400, "best_of"),
    "token outside the vocabulary": (
        "POST",
        "/v1/completions",
        b'{"model": "tiny", "prompt": [5, 99999]}',
        400,
        "outside the vocabulary",
    ),
    "batch of prompts": ("POST", "/v1/completions", b'{"prompt": ["a", "b"]}', 400, "one prompt per request"),
    "unknown endpoint": ("GET", "/v1/engines", b"", 404, "no such endpoint"),
    "wrong method": ("GET", CHAT, b"", 405, "GET is not allowed"),
    "oversize body": ("POST", CHAT, b"x" * (MAX_BODY_BYTES + 1), 413, "too large"),
}


def error_message(path: str, answer: Any) -> str:
    body = answer.json()
    if path.startswith("/api/"):
        assert isinstance(body["error"], str)
        return body["error"]
    assert body["error"]["type"] in ("invalid_request_error", "server_error")
    return body["error"]["message"]


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> Any:
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_4xx_with_a_message(http: Any, name: str) -> None:
    method, path, body, status, message = BAD_REQUESTS[name]
    answer = http.request(method, path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert message in error_message(path, answer)
    assert http.get("/health").json() == {"status": "ok"}


def test_oversize_chunked_body_is_refused(http: Any) -> None:
    def chunks() -> Any:
        for _ in range(8):
            yield b"y" * (MAX_BODY_BYTES // 4)

    answer = http.post(CHAT, content=chunks())  # no Content-Length: the size shows only as it arrives
    assert answer.status_code == 413
    assert "too large" in error_message(CHAT, answer)


def test_json_sent_as_a_form_is_read(http: Any) -> None:
    """`curl -d` labels JSON as a form; Ollama and OpenAI servers accept it."""
    answer = http.post(
        "/api/chat",
        content=json.dumps(
            {"model": MODEL_NAME, "messages": USER, "stream": False, "options": {"num_predict": 2}}
        ),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 200 and answer.json()["done"] is True


def test_an_engine_failure_is_a_500_and_the_server_goes_on(
    http: Any, live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = live_server.llm.engine

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("kernel exploded")

    live_server.wait_idle()
    failed = live_server.stats()["failed"]
    monkeypatch.setattr(engine, "generate", broken)
    answer = http.post(CHAT, content=chat(max_tokens=4))
    assert answer.status_code == 500
    assert "kernel exploded" in answer.json()["error"]["message"]
    with http.stream("POST", CHAT, content=chat(max_tokens=4, stream=True)) as streamed:
        assert streamed.status_code == 200  # the headers were sent before the failure
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert "kernel exploded" in json.loads(events[-1][6:])["error"]["message"]
    monkeypatch.undo()
    assert live_server.stats()["failed"] == failed + 2
    answer = http.post(CHAT, content=chat(max_tokens=4, temperature=0, ignore_eos=True))
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
