"""`POST /v1/chat/completions`: render the conversation, then the shared request lifecycle."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from server.api import lifecycle
from server.api.deps import ReadyState
from server.api.http_errors import ERROR_RESPONSES
from server.api.responses import ChatCompletion
from server.api.schemas import ChatCompletionRequest, CompletionRequest
from server.serving import chat_service as chat
from server.serving import fair_pool
from server.serving.chat_template import resolve

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_unset=True,
             responses={**ERROR_RESPONSES, 200: {"description": "a chat completion; with `stream: true`, server-sent "
                                                 "events (one chunk per token, then `data: [DONE]`)",
                                                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: ReadyState):
    async def prepare() -> CompletionRequest:
        template = resolve(state.resident.tokenizer, request.app.state.chat_template)
        loop = asyncio.get_running_loop()  # renders and tokenises, on the validation threads (fair_pool)
        return await loop.run_in_executor(fair_pool.VALIDATE, chat.to_completion, body, state, template)

    return await lifecycle.serve(body.model, prepare, chat.complete, chat.stream, state, request)
