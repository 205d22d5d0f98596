from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from server import completions
from server.deps import ReadyState
from server.engine.errors import SwitchboardError
from server.schemas import CompletionRequest

router = APIRouter(tags=["completions"])


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request, state: ReadyState):
    label = body.model if body.model == "auto" or body.model in state.registry else "base"
    try:
        choices = completions.build_choices(body, state)
        completions.submit(choices, state)
    except SwitchboardError as e:
        state.metrics.requests.labels("unknown" if e.status_code == 404 else label, str(e.status_code)).inc()
        raise
    if body.stream:
        state.metrics.requests.labels(label, "200").inc()
        return StreamingResponse(completions.stream(body, choices, state, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        result = await completions.complete(body, choices, state, request)
    except SwitchboardError as e:
        state.metrics.requests.labels(label, str(e.status_code)).inc()
        raise
    except completions.ClientGone:
        state.metrics.requests.labels(label, "499").inc()
        return Response(status_code=499)  # nobody is listening; the rows are already cancelled
    state.metrics.requests.labels(label, "200").inc()
    return result
