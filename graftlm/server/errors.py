"""Error answers in each API's own shape, and the handlers that turn exceptions into them.

OpenAI clients expect `{"error": {"message", "type", "param", "code"}}`; Ollama clients expect
`{"error": "message"}`. The shape follows the path: `/api/...` is Ollama, anything else OpenAI.
Every handled error is a 4xx/5xx JSON answer with a message; none ends the server.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from graftlm.errors import GraftError
from graftlm.server.schemas import describe_errors
from graftlm.server.service import APIError

log = logging.getLogger(__name__)


def error_payload(
    path: str, status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    if path.startswith("/api/"):
        return {"error": message}
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_bytes(path: str, status: int, message: str, **kwargs: Any) -> bytes:
    return json.dumps(error_payload(path, status, message, **kwargs)).encode()


def error_response(request: Request, status: int, message: str, **kwargs: Any) -> JSONResponse:
    return JSONResponse(error_payload(request.url.path, status, message, **kwargs), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_errors(list(exc.errors()))
        return error_response(request, 400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(request, exc.status_code, message)

    @app.exception_handler(GraftError)
    async def _graft(request: Request, exc: GraftError) -> JSONResponse:
        return error_response(request, 400, str(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}")
