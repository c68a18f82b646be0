"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions.

Streaming answers are server-sent events (`data: {chunk}` ... `data: [DONE]`). Defaults follow
OpenAI's: temperature 1, top_p 1, and for /v1/completions max_tokens 16; chat's max_tokens
defaults to what fits the context (capped by the server's default). Extensions, as in vLLM:
`top_k` and `ignore_eos`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from graftlm.errors import GraftError
from graftlm.server.schemas import ChatCompletionRequest, CompletionRequest
from graftlm.server.service import ServedModel, parse_body, usage
from graftlm.server.worker import Job

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _served(request: Request) -> ServedModel:
    return request.app.state.served


def _finish_reason(reason: str) -> str | None:
    return reason if reason in ("stop", "length") else None


def _sampling_fields(body: Any) -> dict[str, Any]:
    return {
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": body.seed,
        "stop": body.stop or [],
        "ignore_eos": body.ignore_eos,
    }


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    served = _served(request)
    entry = {"id": served.name, "object": "model", "created": served.created, "owned_by": "graftlm"}
    return {"object": "list", "data": [entry]}


@router.get("/models/{name:path}")
async def get_model(name: str, request: Request) -> dict[str, Any]:
    served = _served(request)
    served.require(name)
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "graftlm"}


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Any:
    body = await parse_body(request, ChatCompletionRequest)
    served = _served(request)
    served.require(body.model)
    ids = served.chat_ids([m.as_template_message() for m in body.messages])
    params = served.sampling(ids, body.token_limit, **_sampling_fields(body))
    job = served.submit(request, "chatcmpl", ids, params)
    base = {"id": job.id, "created": int(time.time()), "model": served.name, "system_fingerprint": None}

    if body.stream:

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "object": "chat.completion.chunk", "choices": [choice]}

        first = chunk({"role": "assistant", "content": ""}, None)
        events = _sse(job, base, "chat.completion.chunk", body.include_usage, first, chunk)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    result = await served.wait(job, request)
    message = {"role": "assistant", "content": result.text}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": _finish_reason(result.finish_reason),
    }
    return {**base, "object": "chat.completion", "choices": [choice], "usage": usage(result)}


@router.post("/completions", response_model=None)
async def completions(request: Request) -> Any:
    body = await parse_body(request, CompletionRequest)
    served = _served(request)
    served.require(body.model)
    ids = served.text_ids(body.prompt)
    params = served.sampling(ids, body.max_tokens, **_sampling_fields(body))
    job = served.submit(request, "cmpl", ids, params)
    base = {"id": job.id, "created": int(time.time()), "model": served.name, "system_fingerprint": None}

    if body.stream:

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
            return {**base, "object": "text_completion", "choices": [choice]}

        events = _sse(job, base, "text_completion", body.include_usage, None, chunk)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    result = await served.wait(job, request)
    choice = {
        "index": 0,
        "text": result.text,
        "logprobs": None,
        "finish_reason": _finish_reason(result.finish_reason),
    }
    return {**base, "object": "text_completion", "choices": [choice], "usage": usage(result)}


def _event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _sse(
    job: Job,
    base: dict[str, Any],
    obj: str,
    include_usage: bool,
    first: dict[str, Any] | None,
    chunk: Callable[[dict[str, Any], str | None], dict[str, Any]],
) -> AsyncIterator[str]:
    """The event stream of one job. Leaving early (the client disconnected) cancels the job."""
    try:
        if first is not None:
            yield _event(first)
        try:
            async for piece in job.stream():
                yield _event(chunk({"content": piece}, None))
        except GraftError as exc:  # headers are sent: report in the stream, as OpenAI does
            yield _event({"error": {"message": str(exc), "type": "invalid_request_error"}})
            return
        except Exception as exc:
            log.error("%s failed while streaming", job.id, exc_info=exc)
            yield _event({"error": {"message": f"internal error: {exc}", "type": "server_error"}})
            return
        result = job.result
        assert result is not None
        last = chunk({}, _finish_reason(result.finish_reason))
        if include_usage:
            last["usage"] = None
        yield _event(last)
        if include_usage:
            yield _event({**base, "object": obj, "choices": [], "usage": usage(result)})
        yield _event("[DONE]")
    finally:
        job.cancel()  # a no-op once the job has finished
