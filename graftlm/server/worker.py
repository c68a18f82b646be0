"""One worker thread runs every generation, one at a time; requests wait in a bounded queue.

The engine serves one sequence per call, so requests are queued, not batched. The event loop
never runs the model: a handler submits a `Job` and awaits its events, which the worker hands
over with `loop.call_soon_threadsafe` into the job's asyncio queue. Each job carries a cancel
flag (a `threading.Event`) that the engine polls through `should_stop` before every forward
step; a handler sets it when its client goes away, and a queued job whose flag is set is dropped
without running.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from graftlm.engine.generate import Engine, GenerationResult
from graftlm.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

RECENT_JOBS = 32  # finished jobs kept for /graftlm/stats


class QueueFullError(RuntimeError):
    """Too many requests are already waiting."""


@dataclass
class Job:
    """One generation request: prompt ids and sampling parameters in, text events out."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    result: GenerationResult | None = None

    def cancel(self) -> None:
        """Ask the worker to stop this job (or to skip it while queued); safe from any thread."""
        self.cancel_flag.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_flag.is_set()

    def emit(self, kind: str, value: Any) -> None:
        """Hand an event to the event loop (called on the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self.cancel()

    async def stream(self) -> AsyncIterator[str]:
        """Yield text pieces; afterwards `self.result` holds the GenerationResult.

        An exception raised by the engine is re-raised here.
        """
        while True:
            kind, value = await self.events.get()
            if kind == "text":
                yield value
            elif kind == "done":
                self.result = value
                return
            else:
                raise value

    async def wait(self) -> GenerationResult:
        """The GenerationResult, once the job has finished."""
        async for _ in self.stream():
            pass
        assert self.result is not None
        return self.result


@dataclass
class WorkerStats:
    completed: int = 0  # finished with "stop" or "length"
    cancelled: int = 0  # stopped by a cancel flag, running or queued
    failed: int = 0  # the engine raised
    active: str | None = None  # id of the running job
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_JOBS))


class GenerationWorker:
    """Runs queued Jobs on one thread with `engine.generate`; see the module docstring."""

    def __init__(self, engine: Engine, max_queue: int = 64) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: dict[str, None] = {}  # ids in arrival order
        self._lock = threading.Lock()
        self._stats = WorkerStats()
        self._active: Job | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="graftlm-generate", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running and queued jobs and end the thread."""
        with self._lock:
            if self._active is not None:
                self._active.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                self._skip(job)
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the generation thread did not stop within %.0f s", timeout)
            self._thread = None

    # -- requests --------------------------------------------------------------------------

    def submit(self, job: Job) -> int:
        """Queue `job`; returns how many jobs were ahead of it (0: it runs next)."""
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the server is busy: {len(self._waiting)} requests are already queued")
            ahead = len(self._waiting) + (self._active is not None)
            self._waiting[job.id] = None
        self._queue.put(job)
        return ahead

    def snapshot(self) -> dict[str, Any]:
        """Counters, the active job and the last finished jobs, as JSON-ready data."""
        with self._lock:
            return {
                "queued": len(self._waiting),
                "waiting": list(self._waiting),
                "active": self._stats.active,
                "completed": self._stats.completed,
                "cancelled": self._stats.cancelled,
                "failed": self._stats.failed,
                "recent": list(self._stats.recent),
            }

    # -- the thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting.pop(job.id, None)
                skip = job.cancelled
                if not skip:
                    self._active = job
                    self._stats.active = job.id
            if skip:
                self._skip(job)
            else:
                self._run(job)

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        try:
            result = self.engine.generate(
                job.prompt_ids,
                job.params,
                on_text=lambda piece: job.emit("text", piece),
                should_stop=job.cancel_flag.is_set,
            )
        except Exception as exc:  # a bad request must not end the worker
            log.exception("request %s failed", job.id)
            self._record(job, "error", 0, started, counter="failed")
            job.emit("error", exc)
            return
        counter = "cancelled" if result.finish_reason == "cancelled" else "completed"
        self._record(job, result.finish_reason, len(result.token_ids), started, counter=counter)
        job.emit("done", result)

    def _skip(self, job: Job) -> None:
        """A job cancelled before it ran: count it and tell its (likely gone) listener."""
        self._record(job, "cancelled", 0, time.perf_counter(), counter="cancelled")
        job.emit("done", GenerationResult([], "", "cancelled", len(job.prompt_ids), 0.0, 0.0))

    def _record(self, job: Job, finish: str, tokens: int, started: float, *, counter: str) -> None:
        now = time.perf_counter()
        entry = {
            "id": job.id,
            "finish_reason": finish,
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": tokens,
            "queued_seconds": round(started - job.created, 4),
            "run_seconds": round(now - started, 4),
        }
        with self._lock:
            setattr(self._stats, counter, getattr(self._stats, counter) + 1)
            self._stats.recent.append(entry)
            self._waiting.pop(job.id, None)
            if self._active is job:
                self._active = None
                self._stats.active = None
