"""Pure ASGI middleware: a request-body size limit, and one log line per request.

The body is read here, up to the limit, before any handler sees it: an oversize body is answered
413 at once (from its Content-Length, or as soon as the bytes pass the limit), so no handler ever
parses one. The log line is written when the response has been sent in full, streams included,
so it can carry the generation's id, token counts and finish reason.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from graftlm.server.errors import error_bytes

log = logging.getLogger("graftlm.server")

DRAIN_LIMIT = 64 * 1024 * 1024  # past this, an oversize body's sender gets a closed connection


class RequestMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: list[int] = [0]

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            replay = await self._read_body(scope, receive, send_logged)
            if replay is not None:
                await self.app(scope, replay, send_logged)
        finally:
            log.info(_log_line(scope, status[0], time.perf_counter() - start))

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body (bounded); returns a receive that replays it, or None if answered."""
        limit = self.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > limit
        chunks: list[bytes] = []
        size = 0
        more = True
        while more and not too_large:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left before sending its body
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            too_large = size > limit
            chunks.append(body)
        if too_large:
            if more:
                size += await self._drain(receive)
            await self._too_large(scope, send, max(size, int(declared or 0)))
            return None
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await receive()  # after the body: http.disconnect when the client goes away

        return replay

    async def _drain(self, receive: Receive) -> int:
        """Discard the rest of an oversize body (up to DRAIN_LIMIT), so that the client, which
        sends its whole body before reading, gets the 413 instead of a reset connection."""
        drained = 0
        while drained < DRAIN_LIMIT:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return drained

    async def _too_large(self, scope: Scope, send: Send, size: int) -> None:
        message = f"the request body is too large: {size} bytes (limit {self.max_body_bytes})"
        body = error_bytes(scope.get("path", ""), 413, message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _log_line(scope: Scope, status: int, seconds: float) -> str:
    client = scope.get("client")
    where = f"{client[0]}:{client[1]}" if client else "-"
    line = f'{where} "{scope.get("method")} {scope.get("path")}" {status or "-"} {seconds * 1000:.0f} ms'
    job: Any = (scope.get("state") or {}).get("graftlm_job")
    if job is not None:
        result = job.result
        if result is None:  # the client left before the result was collected
            line += f" {job.id} (client gone)"
        else:
            line += (
                f" {job.id} prompt={result.prompt_tokens} completion={len(result.token_ids)} "
                f"finish={result.finish_reason}"
            )
    return line
