from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from server import chat, completions
from server.chat_template import resolve
from server.deps import ReadyState
from server.engine.errors import SwitchboardError

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions")
async def create_chat_completion(body: chat.ChatCompletionRequest, request: Request, state: ReadyState):
    label = body.model if body.model == "auto" or body.model in state.registry else "base"
    try:
        template = resolve(state.resident.tokenizer, request.app.state.chat_template)
        creq = chat.to_completion(body, state, template)
        choices = completions.build_choices(creq, state)
        completions.submit(choices, state)
    except SwitchboardError as e:
        state.metrics.requests.labels("unknown" if e.status_code == 404 else label, str(e.status_code)).inc()
        raise
    if body.stream:
        state.metrics.requests.labels(label, "200").inc()
        return StreamingResponse(chat.stream(creq, choices, state, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        result = await chat.complete(creq, choices, state, request)
    except SwitchboardError as e:
        state.metrics.requests.labels(label, str(e.status_code)).inc()
        raise
    except completions.ClientGone:
        state.metrics.requests.labels(label, "499").inc()
        return Response(status_code=499)
    state.metrics.requests.labels(label, "200").inc()
    return result
