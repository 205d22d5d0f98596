"""`POST /v1/completions`: parse the body, hand it to the shared request lifecycle."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api import lifecycle
from server.api.deps import ReadyState
from server.api.http_errors import ERROR_RESPONSES
from server.api.responses import Completion
from server.api.schemas import CompletionRequest
from server.serving import completion_service

router = APIRouter(tags=["completions"])


@router.post("/v1/completions", response_model=Completion, response_model_exclude_unset=True,
             responses={**ERROR_RESPONSES, 200: {"description": "a completion; with `stream: true`, server-sent "
                                                 "events (one chunk per token, then `data: [DONE]`)",
                                                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def create_completion(body: CompletionRequest, request: Request, state: ReadyState):
    async def prepare() -> CompletionRequest:
        return body

    return await lifecycle.serve(body.model, prepare, completion_service.complete, completion_service.stream,
                                 state, request)
