"""A cap on request body size, enforced before the body is parsed (pure ASGI middleware).

JSON parsing runs on the event loop; without a cap one huge body stalls every other request
while it parses. A declared `Content-Length` over the limit is answered 413 at once; a chunked
body is counted as it arrives and refused as soon as it passes the limit.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _message(limit: int) -> str:
    return f"request body larger than {limit} bytes (max_body_bytes)"


def _413(limit: int) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": _message(limit),
                                 "type": "invalid_request_error", "param": None, "code": "body_too_large"}}).encode()
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # raised inside the route's body read: the error handler answers
                    raise HTTPException(413, _message(self.max_bytes))
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, send: Any) -> None:
        start, body = _413(self.max_bytes)
        await send(start)
        await send({"type": "http.response.body", "body": body})
