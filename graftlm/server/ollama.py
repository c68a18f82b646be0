"""Ollama-compatible endpoints: /api/chat, /api/generate (NDJSON streams), /api/tags, /api/show.

As in Ollama, `stream` defaults to true and the sampling defaults are temperature 0.8, top_k 40,
top_p 0.9; `options.num_predict` -1 or -2 means "until the context is full". /api/generate
renders `prompt` (and `system`) through the chat template unless `raw` is true or the model has
none. A request with no prompt or no messages only answers `done_reason: "load"`, as Ollama does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from graftlm.errors import GraftError
from graftlm.server.modelinfo import ModelInfo
from graftlm.server.schemas import (
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaOptions,
    OllamaShowRequest,
)
from graftlm.server.service import APIError, ServedModel, parse_body
from graftlm.server.worker import Job

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api")

DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
NDJSON = "application/x-ndjson"


def _served(request: Request) -> ServedModel:
    return request.app.state.served


def _info(request: Request) -> ModelInfo:
    return request.app.state.model_info


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _tag(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _sampling(served: ServedModel, ids: list[int], options: OllamaOptions) -> Any:
    num_predict = options.num_predict
    if num_predict is not None and num_predict < 0:
        room = None if served.max_context is None else served.max_context - len(ids)
        num_predict = room if room is not None and room > 0 else None
    fields = {k: getattr(options, k) if getattr(options, k) is not None else v for k, v in DEFAULTS.items()}
    return served.sampling(ids, num_predict, seed=options.seed, stop=options.stop or [], **fields)


def _stats(result: Any, started: float) -> dict[str, Any]:
    return {
        "done_reason": result.finish_reason,
        "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens,
        "prompt_eval_duration": int(result.prefill_seconds * 1e9),
        "eval_count": len(result.token_ids),
        "eval_duration": int(result.decode_seconds * 1e9),
    }


@router.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    served, info = _served(request), _info(request)
    entry = {
        "name": _tag(served.name),
        "model": _tag(served.name),
        "modified_at": info.modified.isoformat(),
        "size": info.size_bytes,
        "digest": info.digest,
        "details": info.details(),
    }
    return {"models": [entry]}


@router.post("/show")
async def show(request: Request) -> dict[str, Any]:
    body = await parse_body(request, OllamaShowRequest)
    served, info = _served(request), _info(request)
    name = body.model or body.name
    if not name:
        raise APIError(400, "invalid request: 'model' is required", param="model")
    served.require(name)
    model_info: dict[str, Any] = {
        "general.architecture": info.family,
        "general.parameter_count": info.parameter_count,
    }
    if info.context_length is not None:
        model_info[f"{info.family}.context_length"] = info.context_length
    return {
        "license": "",
        "modelfile": f"# served by graftlm\nFROM {info.path}\n",
        "parameters": "\n".join(f"{k} {v}" for k, v in DEFAULTS.items()),
        "template": served.chat_template or "",
        "details": info.details(),
        "model_info": model_info,
        "capabilities": ["completion"],
        "modified_at": info.modified.isoformat(),
    }


@router.post("/chat", response_model=None)
async def chat(request: Request) -> Any:
    started = time.perf_counter()
    body = await parse_body(request, OllamaChatRequest)
    served = _served(request)
    served.require(body.model)
    head = {"model": body.model, "created_at": _now()}
    if not body.messages:
        return {**head, "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"}
    ids = served.chat_ids([{"role": m.role, "content": m.content} for m in body.messages])
    job = served.submit(request, "chat", ids, _sampling(served, ids, body.options))

    def line(piece: str, done: bool) -> dict[str, Any]:
        message = {"role": "assistant", "content": piece}
        return {"model": body.model, "created_at": _now(), "message": message, "done": done}

    if body.stream:
        return StreamingResponse(_ndjson(job, started, line), media_type=NDJSON)
    result = await served.wait(job, request)
    return {**line(result.text, True), **_stats(result, started)}


@router.post("/generate", response_model=None)
async def generate(request: Request) -> Any:
    started = time.perf_counter()
    body = await parse_body(request, OllamaGenerateRequest)
    served = _served(request)
    served.require(body.model)
    head = {"model": body.model, "created_at": _now()}
    if not body.prompt:
        return {**head, "response": "", "done": True, "done_reason": "load"}
    if body.raw or served.chat_template is None:
        ids = served.text_ids(body.prompt)
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []
        ids = served.chat_ids(system + [{"role": "user", "content": body.prompt}])
    job = served.submit(request, "gen", ids, _sampling(served, ids, body.options))

    def line(piece: str, done: bool) -> dict[str, Any]:
        return {"model": body.model, "created_at": _now(), "response": piece, "done": done}

    if body.stream:
        return StreamingResponse(_ndjson(job, started, line), media_type=NDJSON)
    result = await served.wait(job, request)
    return {**line(result.text, True), **_stats(result, started)}


async def _ndjson(
    job: Job, started: float, line: Callable[[str, bool], dict[str, Any]]
) -> AsyncIterator[str]:
    """One JSON object per line; the last has done=true and the counts. Leaving early cancels."""
    try:
        try:
            async for piece in job.stream():
                yield json.dumps(line(piece, False)) + "\n"
        except GraftError as exc:
            yield json.dumps({"error": str(exc)}) + "\n"
            return
        except Exception as exc:
            log.error("%s failed while streaming", job.id, exc_info=exc)
            yield json.dumps({"error": f"internal error: {exc}"}) + "\n"
            return
        assert job.result is not None
        yield json.dumps({**line("", True), **_stats(job.result, started)}) + "\n"
    finally:
        job.cancel()  # a no-op once the job has finished
