"""GenerationWorker on its own: the queue bound, cancelling, and stopping."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (fastapi)")

from graftlm.engine.generate import GenerationResult  # noqa: E402
from graftlm.engine.sampling import SamplingParams  # noqa: E402
from graftlm.server.worker import GenerationWorker, Job, QueueFullError  # noqa: E402


class ScriptedEngine:
    """Yields one piece per step until told to stop; records the prompts it ran."""

    def __init__(self) -> None:
        self.ran: list[list[int]] = []

    def generate(self, prompt: list[int], params: SamplingParams, *, on_text: Any, should_stop: Any) -> Any:
        self.ran.append(prompt)
        pieces = []
        for i in range(params.max_new_tokens):
            if should_stop():
                return GenerationResult(pieces, "".join(map(str, pieces)), "cancelled", len(prompt), 0.0, 0.0)
            pieces.append(i)
            on_text(str(i))
        return GenerationResult(pieces, "".join(map(str, pieces)), "length", len(prompt), 0.0, 0.0)


def job(loop: asyncio.AbstractEventLoop, name: str, tokens: int = 3) -> Job:
    return Job(name, [1, 2], SamplingParams(max_new_tokens=tokens), loop)


def test_jobs_run_in_order_and_stream_their_pieces() -> None:
    engine = ScriptedEngine()
    worker = GenerationWorker(engine)  # type: ignore[arg-type]

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        jobs = [job(loop, f"j{i}", tokens=i + 1) for i in range(3)]
        for j in jobs:
            worker.submit(j)
        worker.start()
        texts = []
        for j in jobs:
            texts.append("".join([piece async for piece in j.stream()]))
            assert j.result is not None and j.result.finish_reason == "length"
        return texts

    try:
        assert asyncio.run(scenario()) == ["0", "01", "012"]
    finally:
        worker.stop()
    snap = worker.snapshot()
    assert snap["completed"] == 3 and snap["queued"] == 0 and snap["active"] is None
    assert [r["id"] for r in snap["recent"]] == ["j0", "j1", "j2"]


def test_the_queue_is_bounded_and_stop_cancels_waiting_jobs() -> None:
    engine = ScriptedEngine()
    worker = GenerationWorker(engine, max_queue=2)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        first, second = job(loop, "a"), job(loop, "b")
        assert worker.submit(first) == 0 and worker.submit(second) == 1
        with pytest.raises(QueueFullError, match="2 requests are already queued"):
            worker.submit(job(loop, "c"))
        worker.stop()  # never started: both jobs are dropped, not run
        assert first.cancelled and second.cancelled
        assert engine.ran == []
        assert worker.snapshot()["cancelled"] == 2
    finally:
        loop.close()
