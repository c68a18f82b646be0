"""The served model as the endpoints see it: its name, prompt encoding, request checks, jobs.

Both API flavours go through `ServedModel`: it resolves the model name, renders and tokenizes the
prompt, turns request fields into SamplingParams (4xx on anything out of range, including a
`max_tokens` that does not fit the context), submits the job and watches for a client that goes
away. The model itself runs only on the worker thread (see worker.py).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from graftlm.engine.generate import Engine
from graftlm.engine.sampling import SamplingParams
from graftlm.errors import GraftError
from graftlm.server.schemas import describe_errors
from graftlm.server.worker import GenerationWorker, Job, QueueFullError

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.1

Body = TypeVar("Body", bound=BaseModel)


class APIError(Exception):
    """An error answered to the client with `status` and `message` (never a traceback)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


async def parse_body(request: Request, schema: type[Body]) -> Body:
    """The request's JSON body validated by `schema`, whatever its Content-Type says
    (`curl -d` sends JSON as a form); every failure is a 400 with a message."""
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "the request body is empty: send a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON in the request body: {exc}") from exc
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = describe_errors(list(exc.errors()))
        raise APIError(400, message, param=param) from exc


def default_model_name(path: str | Path) -> str:
    """The name clients use for a model: the file's stem, or the folder's name."""
    p = Path(path)
    return p.name if p.is_dir() else p.stem


class ServedModel:
    """One loaded LLM behind the HTTP endpoints."""

    def __init__(self, llm: Any, name: str, *, default_max_tokens: int = 1024, max_queue: int = 64) -> None:
        self.llm = llm
        self.name = name
        self.engine: Engine = llm.engine
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.max_context: int | None = self.engine.max_context
        # Prompts are tokenized on the event loop with a private copy of the tokenizer, so the
        # worker thread, which decodes with the engine's own, never shares one with it.
        self._prompts = Engine(self.engine.model, copy.deepcopy(self.engine.tokenizer), device="cpu")
        self.worker = GenerationWorker(self.engine, max_queue=max_queue)

    # -- names -----------------------------------------------------------------------------

    def matches(self, name: str | None) -> bool:
        return name in (None, "", self.name, f"{self.name}:latest")

    def require(self, name: str | None) -> None:
        if not self.matches(name):
            raise APIError(
                404,
                f"model '{name}' not found: this server serves '{self.name}'",
                param="model",
                code="model_not_found",
            )

    # -- prompts ---------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return getattr(self._prompts.tokenizer, "chat_template", None) or None

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return self._prompts.encode_chat(messages)
        except GraftError as exc:
            raise APIError(400, str(exc), param="messages") from exc

    def text_ids(self, prompt: str | list[int]) -> list[int]:
        ids = self._prompts.encode(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty (and the tokenizer adds no BOS token)", param="prompt")
        vocab = self.engine.vocab_size
        if vocab is not None and any(not 0 <= i < vocab for i in ids):
            bad = next(i for i in ids if not 0 <= i < vocab)
            raise APIError(400, f"token id {bad} is outside the vocabulary (size {vocab})", param="prompt")
        return ids

    # -- sampling --------------------------------------------------------------------------

    def sampling(self, ids: list[int], max_tokens: int | None, **fields: Any) -> SamplingParams:
        """SamplingParams for a prompt of `ids`; `max_tokens` None means as many as fit (capped).

        An explicit `max_tokens` that does not fit the context is a 400, as in OpenAI's API.
        """
        context = self.max_context
        room = None if context is None else context - len(ids)
        if room is not None and room < 1:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens but the context holds {context}: shorten the prompt",
                param="messages",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = self.default_max_tokens if room is None else min(self.default_max_tokens, room)
        elif room is not None and max_tokens > room:
            raise APIError(
                400,
                f"max_tokens is {max_tokens} but the context holds {context} tokens and the prompt "
                f"uses {len(ids)}: at most {room} can be generated",
                param="max_tokens",
                code="context_length_exceeded",
            )
        try:
            return SamplingParams(
                max_new_tokens=max_tokens, **{k: v for k, v in fields.items() if v is not None}
            )
        except (GraftError, TypeError) as exc:
            raise APIError(400, str(exc)) from exc

    # -- jobs ------------------------------------------------------------------------------

    def submit(self, request: Request, prefix: str, ids: list[int], params: SamplingParams) -> Job:
        """Queue a generation; the request log line names its id."""
        job = Job(f"{prefix}-{uuid.uuid4().hex[:24]}", ids, params, asyncio.get_running_loop())
        try:
            ahead = self.worker.submit(job)
        except QueueFullError as exc:
            raise APIError(503, str(exc), code="server_busy") from exc
        request.state.graftlm_job = job
        if ahead:
            log.debug("%s queued behind %d request(s)", job.id, ahead)
        return job

    async def wait(self, job: Job, request: Request) -> Any:
        """The job's GenerationResult; cancels the job if the client disconnects first."""
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            return await job.wait()
        except GraftError as exc:
            raise APIError(400, str(exc)) from exc
        except Exception as exc:  # the worker has logged the traceback
            raise APIError(500, f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once it has finished


async def watch_disconnect(request: Request, job: Job) -> None:
    """Poll the connection while a non-streaming job runs; cancel the job when it is gone."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
    log.info("%s: client disconnected, cancelling", job.id)
    job.cancel()


def usage(result: Any) -> dict[str, int]:
    completion = len(result.token_ids)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
    }
