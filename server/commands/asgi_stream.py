"""Call an ASGI app in-process and stream its response, for hosts that are not an HTTP server.

A Ray Serve replica receives a request as plain data through Ray (not a socket) and must hand the
response back chunk by chunk while Switchboard's app streams tokens. `stream_asgi` runs the app on
one request and yields the response start, then every body chunk as the app sends it. Closing the
generator early (the client went away) tells the app `http.disconnect`, so the app cancels the
request's rows and releases its adapters exactly as it does for a dropped HTTP connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class HTTPRequest:
    """What the app needs from an HTTP request; plain data so that it crosses process boundaries."""

    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


async def stream_asgi(app: Callable, request: HTTPRequest, *, extra_headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
                      grace: float = 2.0) -> AsyncIterator[dict[str, Any]]:
    """Yield `{"status", "headers"}` once, then `{"body": bytes}` per chunk the app sends.

    `extra_headers` are added to the response start (e.g. which replica answered).
    """
    queue: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await queue.put(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query, "root_path": "", "headers": list(request.headers),
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80),
    }
    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while True:
            message = await queue.get()
            if message is None:  # the app returned (or raised) without finishing the response
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
                return
            if message["type"] == "http.response.start":
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                yield {"status": int(message["status"]), "headers": headers + list(extra_headers)}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield {"body": bytes(message["body"])}
                if not message.get("more_body", False):
                    return
    finally:
        disconnected.set()  # the app sees the client leave, cancels its rows and releases its adapters
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), grace)
            task.cancel()
