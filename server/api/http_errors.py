"""The one error handler at the edge: every failure leaves as `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.errors import SwitchboardError, Unavailable, out_of_memory

log = logging.getLogger(__name__)


class AuthError(SwitchboardError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(SwitchboardError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error",
          507: "insufficient_storage"}


# what pydantic adds to an error's location to say which member of a union failed (`prompt.str`)
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "function-after", "union_tag"})


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape, the body of every non-2xx answer."""

    error: ErrorDetail


def _described(*codes: int) -> dict[int | str, dict]:
    text = {400: "invalid request", 401: "missing admin token", 403: "admin disabled or wrong token",
            404: "unknown model, adapter or router", 409: "conflict (name taken, adapter in use)",
            413: "body, prompt or prompt count over its limit", 429: "request queue full",
            500: "internal error", 503: "model loading or shutting down", 504: "request timed out",
            507: "the adapter store could not be written (full disk, I/O error); nothing was changed"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


# The status codes each kind of route documents in /openapi.json (`responses=` on the routes).
ERROR_RESPONSES = _described(400, 404, 413, 429, 500, 503, 504)
ADMIN_RESPONSES = _described(400, 401, 403, 404, 409, 413, 500, 503, 504, 507)
READY_RESPONSES = _described(503)
MODEL_RESPONSES = _described(404, 503)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: SwitchboardError) -> JSONResponse:
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc.message, exc.error_type, exc.param, exc.code), exc.status_code, headers=headers)


def log_refusal(request: Request, status: int, code: str | None, message: str) -> None:
    """One log line per 4xx/5xx answer with its code and message (never the body): the access log
    says only "400 Bad Request", and clients that hide bodies (lm-eval) would leave a refusal
    invisible from both sides. 4xx at INFO (the client's mistake), 5xx at WARNING."""
    level = logging.WARNING if status >= 500 else logging.INFO
    log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, status, code or "-", message[:300])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SwitchboardError)
    async def _switchboard(request: Request, exc: SwitchboardError) -> JSONResponse:
        log_refusal(request, exc.status_code, exc.code, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path in ("/v1/completions", "/v1/chat/completions"):  # refused before the route ran
            request.app.state.switchboard.metrics.requests.labels("invalid", "400").inc()
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]  # where it came from is not part of the parameter's name
        loc = [p for p in loc if p not in _UNION_TAGS and "[" not in p]  # `prompt.list[int]` is `prompt`
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
        log_refusal(request, 400, "invalid_value", message)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        log_refusal(request, exc.status_code, None, str(exc.detail))
        return JSONResponse(error_body(str(exc.detail), _TYPES.get(exc.status_code, "api_error")),
                            exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if out_of_memory(exc):  # the OS refused memory (a memory limit) on any route: retryable, not a 500
            log.error("%s %s: out of memory (%s: %s)", request.method, request.url.path, type(exc).__name__,
                      str(exc)[:200])
            return error_response(Unavailable(f"the server ran out of memory for this request "
                                              f"({type(exc).__name__}); retry it"))
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal server error", "api_error", None, "internal_error"), 500)
