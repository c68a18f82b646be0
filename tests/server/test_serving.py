"""Serving behaviour: many clients at once, cancellation on disconnect, one log line per request."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

from tests.server.conftest import MODEL_NAME, LiveServer  # noqa: E402

PROMPTS = [
    "The quick brown fox",
    "Hello world",
    "hello graftlm",
    "12345 67890",
    "The lazy dog",
    "jumps over the",
    "Hello, hello",
    "brown dog fox",
]


def chat_body(text: str, max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def stream_chat(client: Any, text: str, max_tokens: int) -> tuple[str, str | None]:
    """(the streamed text, the finish reason) of one streaming chat request."""
    pieces, finish = [], None
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(text, max_tokens)) as answer:
        assert answer.status_code == 200
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(pieces), finish


def test_eight_concurrent_streaming_clients(live_server: LiveServer, reference: Any) -> None:
    expected = [
        reference.chat([{"role": "user", "content": p}], max_new_tokens=10, ignore_eos=True).text
        for p in PROMPTS
    ]
    before = live_server.stats()

    async def run_all() -> list[tuple[str, str | None]]:
        async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as client:
            return await asyncio.gather(*(stream_chat(client, p, 10) for p in PROMPTS))

    results = asyncio.run(run_all())
    assert [text for text, _ in results] == expected
    assert all(finish == "length" for _, finish in results)
    after = live_server.stats()
    assert after["completed"] - before["completed"] == len(PROMPTS)
    runs = after["recent"][-len(PROMPTS) :]
    assert all(r["completion_tokens"] == 10 for r in runs)
    assert max(r["queued_seconds"] for r in runs) > min(r["run_seconds"] for r in runs), (
        "some requests should have waited while another ran"
    )


def test_disconnect_mid_stream_cancels_the_generation(live_server: LiveServer, slow_model: Any) -> None:
    before = live_server.stats()["cancelled"]
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=chat_body("Hello world", 200)) as answer:
            lines = answer.iter_lines()
            received = [line for _, line in zip(range(6), lines)]  # a few events, then hang up
            job_id = json.loads(received[0][6:])["id"]
            assert live_server.stats()["active"] == job_id
    entry = live_server.wait_for(
        lambda: next((r for r in live_server.stats()["recent"] if r["id"] == job_id), None),
        timeout=10,
        what="the disconnected stream's generation to end",
    )
    assert entry["finish_reason"] == "cancelled"
    assert entry["completion_tokens"] < 100, "the generation should stop soon after the client left"
    stats = live_server.stats()
    assert stats["cancelled"] == before + 1 and stats["active"] is None


def test_disconnect_from_a_non_streaming_request_cancels_it(live_server: LiveServer, slow_model: Any) -> None:
    seen = {r["id"] for r in live_server.stats()["recent"]}
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json=chat_body("Hello world", 200, stream=False), timeout=0.8)
    entry = live_server.wait_for(
        lambda: next((r for r in live_server.stats()["recent"] if r["id"] not in seen), None),
        timeout=10,
        what="the abandoned request's generation to end",
    )
    assert entry["finish_reason"] == "cancelled" and entry["completion_tokens"] < 150


def test_a_queued_request_whose_client_left_never_runs(live_server: LiveServer, slow_model: Any) -> None:
    async def until(predicate: Any, what: str) -> Any:
        for _ in range(500):  # 10 s at most
            if value := predicate():
                return value
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    async def scenario() -> tuple[str, str]:
        async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as client:
            first = asyncio.create_task(stream_chat(client, "Hello world", 40))
            running = await until(lambda: live_server.stats()["active"], "the first request to run")
            second = asyncio.create_task(stream_chat(client, "The quick brown fox", 40))
            await until(lambda: live_server.stats()["queued"] == 1, "the second request to wait")
            waiting = live_server.stats()["waiting"][0]
            second.cancel()  # the second client goes away while it waits
            await asyncio.gather(second, return_exceptions=True)
            text, finish = await first
            assert finish == "length" and text
            return running, waiting

    first_id, second_id = asyncio.run(scenario())
    live_server.wait_idle()
    recent = {r["id"]: r for r in live_server.stats()["recent"]}
    assert recent[first_id]["finish_reason"] == "length"
    skipped = recent[second_id]
    assert skipped["finish_reason"] == "cancelled"
    assert skipped["completion_tokens"] == 0 and skipped["run_seconds"] == 0.0


def test_one_log_line_per_request(live_server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="graftlm.server")
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        answer = client.post("/v1/chat/completions", json=chat_body("Hello world", 3, stream=False)).json()
        client.get("/v1/models")
        client.post("/api/chat", json={"model": "nope", "messages": []})
    lines = [r.getMessage() for r in caplog.records if r.name == "graftlm.server"]
    assert len(lines) == 3, lines
    assert '"POST /v1/chat/completions" 200' in lines[0]
    assert f"{answer['id']} prompt=" in lines[0] and "completion=3 finish=length" in lines[0]
    assert '"GET /v1/models" 200' in lines[1]
    assert '"POST /api/chat" 404' in lines[2]
