"""The FastAPI application: OpenAI and Ollama routers, the chat page, stats, errors, logging.

`create_app(llm)` builds an app around one loaded model; its lifespan starts and stops the
generation worker. `GET /graftlm/stats` reports the queue, the running request and counters of
completed, cancelled and failed requests (also in `app.state.served.worker`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from graftlm.server import ollama, openai
from graftlm.server.errors import install_error_handlers
from graftlm.server.middleware import RequestMiddleware
from graftlm.server.modelinfo import model_info
from graftlm.server.service import ServedModel, default_model_name

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024


def chat_page() -> str:
    return resources.files("graftlm.server").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(
    llm: Any,
    *,
    model_name: str | None = None,
    default_max_tokens: int = 1024,
    max_queue: int = 64,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """An ASGI app serving `llm` (graftlm.api.LLM) under `model_name` (default: the file's stem).

    The prompt side keeps its own copy of the tokenizer, taken here: set a chat template on
    `llm.tokenizer` before calling this.
    """
    if model_name is None:
        model_name = default_model_name(llm.files.path) if llm.files is not None else "graftlm"
    served = ServedModel(llm, model_name, default_max_tokens=default_max_tokens, max_queue=max_queue)
    info = model_info(llm)
    page = chat_page()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served.worker.start()
        log.info(
            "serving %s as '%s' (context %s tokens)", info.path or "a model", served.name, info.context_length
        )
        try:
            yield
        finally:
            served.worker.stop()

    app = FastAPI(title="graftlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.state.model_info = info
    install_error_handlers(app)
    app.add_middleware(RequestMiddleware, max_body_bytes=max_body_bytes)
    app.include_router(openai.router)
    app.include_router(ollama.router)

    # HEAD too: Ollama's clients probe a server with `HEAD /`, monitors with HEAD on either.
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/graftlm/stats")
    async def stats(request: Request) -> dict[str, Any]:
        return {"model": served.name, "context": served.max_context, **served.worker.snapshot()}

    return app
