"""vLLM's `/tokenize` and `/detokenize`: the resident tokenizer, and for a conversation the chat
template the chat route renders with, so clients can count a prompt's tokens exactly."""

from __future__ import annotations

from server.api.schemas import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from server.engine.errors import InvalidRequest
from server.serving import chat_template, validation
from server.serving.chat_service import _messages
from server.state import Services


def tokenize(req: TokenizeRequest, state: Services, template: chat_template.ChatTemplate) -> dict:
    tok = state.resident.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("send exactly one of `prompt` and `messages`", param="prompt")
    if req.messages is not None:
        chat = ChatCompletionRequest.model_construct(model=req.model or "", messages=req.messages)
        text = chat_template.render(tok, template, _messages(chat, state.settings.server.max_prompt_chars), req.add_generation_prompt)
        special = False  # the template wrote them already, as the chat route tokenises
    else:
        text, special = req.prompt or "", req.add_special_tokens
    validation.check_text(text, "prompt")
    if len(text) > state.settings.server.max_prompt_chars:
        raise validation.PayloadTooLarge(f"the text has {len(text)} characters; the limit is "
                                         f"{state.settings.server.max_prompt_chars}", param="prompt")
    ids = list(tok.encode(text, add_special_tokens=special))
    out: dict = {"count": len(ids), "max_model_len": state.resident.max_positions, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = list(tok.convert_ids_to_tokens(ids))
    return out


def detokenize(req: DetokenizeRequest, state: Services) -> dict:
    tok = state.resident.tokenizer
    vocab = len(tok)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(f"token ids {bad[:8]} are not in [0, {vocab})", param="tokens")
    return {"prompt": str(tok.decode(req.tokens))}
