"""What sits around the API for clients: CORS, the inference API key, the 404 that names the
inference endpoints, and the chat template chosen at start.

`--api-key` (SWITCHBOARD_API_KEY) guards the `/v1/*` inference routes (and the inference routes
outside `/v1`: vLLM's /tokenize, /detokenize, LoRAX's /generate, /generate_stream, POST /) the way vLLM's
`--api-key` does: `Authorization: Bearer <key>` or a 401. The vLLM-style admin aliases under
`/v1/` keep the admin token instead, and /health, /ready, /metrics, /version stay open for
probes and scrapers. CORS is off unless `--allowed-origins` lists origins (or `*`).
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from server.api.http_errors import error_body, error_response, log_refusal
from server.engine.errors import Unavailable
from server.serving.chat_template import load_template
from server.settings import Settings

log = logging.getLogger(__name__)

INFERENCE_ENDPOINTS = ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
                       "GET /v1/models/{id}")
ADMIN_ALIASES = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
GUARDED = frozenset({"/generate", "/generate_stream", "/tokenize", "/detokenize"})  # inference outside /v1 (LoRAX, vLLM)


class ApiKeyMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware), so streaming and disconnect detection pass through."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        inference = (path.startswith("/v1/") and path not in ADMIN_ALIASES) or path in GUARDED \
            or (path == "/" and scope.get("method") == "POST")  # LoRAX's router entry
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and inference:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key):
                response = JSONResponse(
                    error_body("a valid API key is required: `Authorization: Bearer <api key>`",
                               "authentication_error", None, "invalid_api_key"),
                    401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HeadAsGet:
    """HEAD on every GET route (/v1/models, /metrics, /version, /, ...), as HTTP requires of a GET
    resource and load balancers and uptime checks expect: the GET runs, its status and headers
    (Content-Length included) are sent, its body is not. Also stamps the request's arrival time
    (`scope["state"]["arrival"]`, i.e. `request.state.arrival`), from which the request timeout is
    counted, before the body is read or parsed."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["arrival"] = time.monotonic()
        if scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Any) -> None:
            if message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class PanicGuard:
    """A library's panic fails its own request, not the server.

    pydantic-core's `PanicException` (a Rust panic, e.g. an allocation the OS refused under a
    memory limit while a response was serialised: "PyObject pointer is null") derives from
    BaseException, not Exception, so it passed every handler and ended the server's event loop
    (tests/product/test_memory_limit.py, about one run in three). Here such an exception becomes
    a retryable 503 in the OpenAI error shape when no response has started, and an ordinary
    error (the connection closed) when one has; the server goes on. Cancellation, exit and
    interrupts pass through untouched."""

    PASS = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def watched(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except (Exception, *self.PASS):
            raise
        except BaseException as e:  # noqa: BLE001 - what no handler below takes
            what = f"{type(e).__name__}: {str(e)[:200]}"
            log.error("%s %s failed inside a library (%s); the server goes on", scope.get("method"),
                      scope.get("path"), what)
            if scope["type"] != "http" or started:
                raise RuntimeError(f"the request failed inside a library ({what})") from e
            error = Unavailable(f"the server could not finish this request ({what}); retry it")
            await error_response(error)(scope, receive, send)


def origins(value: str) -> list[str]:
    return [o.strip() for o in value.split(",") if o.strip()]


def install(app: FastAPI, settings: Settings) -> None:
    """Middleware, the 404 handler and /version; the chat template is loaded (and a bad one
    refused, with ValueError) here, at start."""
    s = settings.server
    app.state.chat_template = load_template(s.chat_template)
    if s.api_key:
        app.add_middleware(ApiKeyMiddleware, key=s.api_key)
    app.add_middleware(HeadAsGet)  # outside the key check: HEAD is checked like the GET it becomes
    app.add_middleware(PanicGuard)  # outside the routes' own handlers, inside Starlette's last-resort 500
    if origins(s.allowed_origins):  # added last = outermost: preflights are answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=origins(s.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in origins(s.allowed_origins))

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        detail = getattr(exc, "detail", "Not Found")
        if detail != "Not Found":  # a route's own 404
            log_refusal(request, 404, None, str(detail))
            return JSONResponse(error_body(str(detail), "not_found_error"), 404)
        message = (f"{request.method} {request.url.path} is not an endpoint of this server. Inference endpoints: "
                   f"{', '.join(INFERENCE_ENDPOINTS)}")
        log_refusal(request, 404, "unknown_endpoint", message)
        return JSONResponse(error_body(message, "not_found_error", None, "unknown_endpoint"), 404)

    @app.get("/version", tags=["health"])
    async def version() -> dict:
        services = getattr(getattr(app.state, "switchboard", None), "services", None)
        # the resolved quantisation once the model is loaded, what was asked for before
        quant = services.resident.quant if services is not None else settings.model.quant
        kernel = services.resident.quant_kernel if services is not None else ""  # which int8 kernel, once loaded
        try:
            version = importlib.metadata.version("lora-switchboard")
        except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
            version = app.version
        return {"version": version, "quantization": quant, "quantization_kernel": kernel}
