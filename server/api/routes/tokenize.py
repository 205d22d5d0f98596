"""vLLM's `POST /tokenize` and `POST /detokenize` (at the root, as vLLM serves them)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from server.api.deps import ReadyState
from server.api.http_errors import ERROR_RESPONSES
from server.api.responses import Detokenized, Tokenized
from server.api.schemas import DetokenizeRequest, TokenizeRequest
from server.serving import tokenizing
from server.serving.chat_template import resolve

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize", response_model=Tokenized, response_model_exclude_unset=True, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request, state: ReadyState) -> dict:
    template = resolve(state.resident.tokenizer, request.app.state.chat_template)
    return await asyncio.to_thread(tokenizing.tokenize, body, state, template)


@router.post("/detokenize", response_model=Detokenized, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, state: ReadyState) -> dict:
    return await asyncio.to_thread(tokenizing.detokenize, body, state)
