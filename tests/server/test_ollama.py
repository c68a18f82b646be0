"""The Ollama endpoints with httpx: NDJSON streams and answers equal graftlm's own generation."""

from __future__ import annotations

import json
from typing import Any

import pytest

httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

from tests.server.conftest import CHAT_TEMPLATE, MODEL_NAME, LiveServer  # noqa: E402

MESSAGES = [{"role": "user", "content": "Hello world"}]
GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> Any:
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        yield client


def ndjson(http: Any, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", path, json=body) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in answer.iter_lines() if line]


def test_chat_matches_llm_chat(http: Any, reference: Any) -> None:
    expected = reference.chat(MESSAGES, max_new_tokens=16)
    body = {"model": MODEL_NAME, "messages": MESSAGES, "options": GREEDY}
    answer = http.post("/api/chat", json={**body, "stream": False}).json()
    assert answer["done"] is True
    assert answer["message"] == {"role": "assistant", "content": expected.text}
    assert answer["done_reason"] == expected.finish_reason
    assert answer["prompt_eval_count"] == expected.prompt_tokens
    assert answer["eval_count"] == len(expected.token_ids)
    assert answer["total_duration"] >= answer["eval_duration"] > 0

    lines = ndjson(http, "/api/chat", body)  # stream defaults to true, as in Ollama
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert "".join(line["message"]["content"] for line in lines) == expected.text
    assert lines[-1]["eval_count"] == len(expected.token_ids)
    assert all(line["model"] == MODEL_NAME for line in lines)


def test_generate_raw_and_templated(http: Any, reference: Any) -> None:
    raw = reference.generate("Hello world", max_new_tokens=16)
    templated = reference.chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}],
        max_new_tokens=16,
    )
    body = {"model": f"{MODEL_NAME}:latest", "prompt": "Hello world", "options": GREEDY}
    lines = ndjson(http, "/api/generate", {**body, "raw": True})
    assert "".join(line["response"] for line in lines) == raw.text
    assert lines[-1]["done"] and lines[-1]["prompt_eval_count"] == raw.prompt_tokens
    answer = http.post("/api/generate", json={**body, "system": "Be brief.", "stream": False}).json()
    assert answer["response"] == templated.text
    assert answer["prompt_eval_count"] == templated.prompt_tokens


def test_empty_requests_only_load(http: Any) -> None:
    answer = http.post("/api/generate", json={"model": MODEL_NAME}).json()
    assert answer["done"] is True and answer["done_reason"] == "load" and answer["response"] == ""
    answer = http.post("/api/chat", json={"model": MODEL_NAME, "messages": []}).json()
    assert answer["done_reason"] == "load"


def test_tags_and_show(http: Any, live_server: LiveServer) -> None:
    tags = http.get("/api/tags").json()["models"]
    assert len(tags) == 1
    assert tags[0]["name"] == f"{MODEL_NAME}:latest"
    assert tags[0]["size"] > 0 and len(tags[0]["digest"]) == 64
    details = tags[0]["details"]
    assert details["format"] == "gguf" and details["family"] == "qwen3moe"
    assert details["quantization_level"] == "F32"
    n_params = sum(p.numel() for p in live_server.llm.model.parameters())
    show = http.post("/api/show", json={"model": MODEL_NAME}).json()
    assert show["template"] == CHAT_TEMPLATE
    assert show["model_info"]["qwen3moe.context_length"] == 256
    assert show["model_info"]["general.parameter_count"] == n_params
    assert show["details"] == details
    assert http.post("/api/show", json={"name": f"{MODEL_NAME}:latest"}).status_code == 200


def test_errors_use_ollamas_shape(http: Any) -> None:
    answer = http.post("/api/chat", json={"model": "llama3", "messages": MESSAGES})
    assert answer.status_code == 404
    assert answer.json() == {"error": f"model 'llama3' not found: this server serves '{MODEL_NAME}'"}
    answer = http.post("/api/show", json={"model": "llama3"})
    assert answer.status_code == 404
    answer = http.post("/api/generate", json={"model": MODEL_NAME, "prompt": "x", "options": {"top_p": 2}})
    assert answer.status_code == 400 and "options.top_p" in answer.json()["error"]


def test_head_probes_answer(http: Any) -> None:
    for path in ("/", "/health"):  # Ollama's CLI checks a server with HEAD /
        answer = http.head(path)
        assert answer.status_code == 200 and answer.content == b""
