from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from server import chat
from server.api_errors import ERROR_RESPONSES
from server.chat_template import resolve
from server.deps import ReadyState
from server.responses import ChatCompletion
from server.routes.completions import serve
from server.schemas import CompletionRequest

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_unset=True,
             responses={**ERROR_RESPONSES, 200: {"description": "a chat completion; with `stream: true`, server-sent "
                                                 "events (one chunk per token, then `data: [DONE]`)",
                                                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def create_chat_completion(body: chat.ChatCompletionRequest, request: Request, state: ReadyState):
    async def prepare() -> CompletionRequest:
        template = resolve(state.resident.tokenizer, request.app.state.chat_template)
        return await asyncio.to_thread(chat.to_completion, body, state, template)  # renders and tokenises

    return await serve(body.model, prepare, chat.complete, chat.stream, state, request)
