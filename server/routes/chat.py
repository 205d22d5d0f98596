from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from server import chat, completions, streaming
from server.api_errors import ERROR_RESPONSES
from server.chat_template import resolve
from server.deps import ReadyState
from server.engine.errors import SwitchboardError
from server.responses import ChatCompletion
from server.routes.completions import _build_off_loop

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_unset=True,
             responses={**ERROR_RESPONSES, 200: {"description": "a chat completion; with `stream: true`, server-sent "
                                                 "events (one chunk per token, then `data: [DONE]`)",
                                                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def create_chat_completion(body: chat.ChatCompletionRequest, request: Request, state: ReadyState):
    label = body.model if body.model == "auto" or body.model in state.registry else "base"
    try:
        template = resolve(state.resident.tokenizer, request.app.state.chat_template)
        creq = await asyncio.to_thread(chat.to_completion, body, state, template)  # renders and tokenises
        choices = await _build_off_loop(creq, state)
        completions.submit(choices, state)
    except SwitchboardError as e:
        state.metrics.requests.labels("unknown" if e.status_code == 404 else label, str(e.status_code)).inc()
        raise
    if body.stream:
        def cancel() -> None:
            for c in choices:
                if c.finish_reason is None:
                    state.worker.cancel(c.seq)

        def outcome(status: str) -> None:
            state.metrics.requests.labels(label, status).inc()

        return StreamingResponse(streaming.guarded(chat.stream(creq, choices, state, request), cancel, outcome),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        result = await chat.complete(creq, choices, state, request)
    except SwitchboardError as e:
        state.metrics.requests.labels(label, str(e.status_code)).inc()
        raise
    except completions.ClientGone:
        state.metrics.requests.labels(label, "499").inc()
        return Response(status_code=499)
    except asyncio.CancelledError:
        state.metrics.requests.labels(label, "499").inc()
        raise
    state.metrics.requests.labels(label, "200").inc()
    return result
