"""LoRAX's REST API: `POST /generate`, `POST /generate_stream`, and `POST /` (LoRAX's router
entry, which the `lorax-client` package calls: a one-element list, or a stream with
`stream: true`). Errors come back in LoRAX's shape, `{"error", "error_type"}`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api import lifecycle
from server.api.deps import ReadyState
from server.api.responses import LoraxError, LoraxGenerated
from server.api.schemas import CompletionRequest, LoraxRequest
from server.engine.errors import SwitchboardError
from server.serving import lorax_service as lorax

router = APIRouter(tags=["lorax"])
_TEXT = {400: "invalid request", 404: "unknown adapter", 413: "body or prompt over its limit",
         429: "request queue full", 500: "internal error", 503: "model loading or shutting down", 504: "timed out"}
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": LoraxError, "description": t} for c, t in _TEXT.items()}
EVENT = {"type": "object", "properties": {"data": {"type": "string", "description": "a JSON object"}}}  # one SSE event
SSE = {"description": "server-sent events: one `token` each, the last with `generated_text` and `details`",
       "content": {"text/event-stream": {"schema": EVENT}}}


async def _serve(body: LoraxRequest, stream: bool, request: Request, state: ReadyState) -> Any:
    async def prepare() -> CompletionRequest:
        return lorax.to_completion(body, stream)

    async def finish(creq, choices, st, req):  # type: ignore[no-untyped-def]
        return await lorax.generate(body, creq, choices, st, req)

    def events(creq, choices, st, req):  # type: ignore[no-untyped-def]
        return lorax.stream(body, creq, choices, st, req)

    try:
        return await lifecycle.serve("auto" if body.parameters.merged_adapters else (body.parameters.adapter_id or "base"),
                                     prepare, finish, events, state, request)
    except SwitchboardError as e:
        kind = "validation" if e.status_code < 500 else "generation"
        return JSONResponse({"error": e.message, "error_type": kind}, status_code=e.status_code)


@router.post("/generate", response_model=LoraxGenerated, response_model_exclude_unset=True, responses=ERRORS)
async def generate(body: LoraxRequest, request: Request, state: ReadyState) -> Any:
    return await _serve(body, False, request, state)


@router.post("/generate_stream", responses={**ERRORS, 200: SSE})
async def generate_stream(body: LoraxRequest, request: Request, state: ReadyState) -> Any:
    return await _serve(body, True, request, state)


@router.post("/", responses={**ERRORS, 200: {
    "description": "`[generate's body]`, or with `stream: true` the events of /generate_stream",
    "content": {"application/json": {"schema": {"type": "array", "items": LoraxGenerated.model_json_schema()}},
                "text/event-stream": {"schema": EVENT}}}})
async def lorax_root(body: LoraxRequest, request: Request, state: ReadyState) -> Any:
    """LoRAX's router entry: a stream when `stream` is true, else `[generate's body]`."""
    out = await _serve(body, body.stream, request, state)
    return [out] if isinstance(out, dict) else out
