"""`POST /v1/chat/completions`: a conversation rendered by the chat template into a prompt, then
served as a completion (same engine, routing and sampling); only the response shape differs.

`model: "auto"` routes on the rendered conversation exactly as on a completions prompt: the first
decision embeds all of it (up to `route_prompt_tokens`), re-routes its last `route_window` tokens
(which by then include the reply so far). The template's role labels are part of what is embedded.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from server.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.engine.errors import InvalidRequest
from server.serving import chat_template, fair_pool, lorax_fields, structured, validation
from server.serving import completion_service as completions
from server.serving.completion_shapes import prompt_logprobs_body, token_decoder
from server.serving.logprobs import chat_logprobs, token_bytes
from server.serving.request_fields import check_fields
from server.state import Services


def _messages(req: ChatCompletionRequest, max_chars: int) -> list[dict[str, str]]:
    """The messages as the template takes them, checked as a completions prompt is: text the
    tokenizer can take (no lone surrogates) and, before anything is rendered or tokenised, at most
    `max_chars` characters in all."""
    out, total = [], 0
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            parts = []
            for j, part in enumerate(m.content):
                where = f"messages.{i}.content.{j}"
                if part.type != "text":
                    raise InvalidRequest(f"content part {j}: type {part.type!r} is not supported (text only)",
                                         param=f"messages.{i}.content")
                if part.text is None:
                    raise InvalidRequest("a content part of type 'text' needs a `text` string", param=f"{where}.text")
                parts.append(validation.check_text(part.text, f"{where}.text"))
            content = "\n".join(parts)
        else:
            content = validation.check_text(m.content or "", f"messages.{i}.content")
        for key, value in (m.model_extra or {}).items():  # name, tool_call_id...: not rendered, still text
            if isinstance(value, str):
                validation.check_text(value, f"messages.{i}.{key}")
        total += len(content)
        if total > max_chars:
            raise validation.PayloadTooLarge(f"the messages have more than {max_chars} characters (max_prompt_chars)",
                                             param="messages")
        out.append({"role": m.role, "content": content})
    return out


def to_completion(req: ChatCompletionRequest, state: Services, template: chat_template.ChatTemplate) -> CompletionRequest:
    """The equivalent completions request: the rendered conversation as a token-id prompt."""
    check_fields(req, req.n)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    model = lorax_fields.adapter_for(req.model, req.model_extra, completions.base_names(state))
    tok = state.resident.tokenizer
    limits = state.settings.server
    text = chat_template.render(tok, template, _messages(req, min(limits.max_prompt_chars, limits.max_request_chars)),
                                req.add_generation_prompt, req.chat_template_kwargs)
    if len(text) > state.settings.server.max_prompt_chars:
        raise validation.PayloadTooLarge(f"the conversation has {len(text)} characters; the limit is "
                              f"{state.settings.server.max_prompt_chars}", param="messages")
    ids = fair_pool.TOKENISE.run(id(req), lambda: tok.encode(text, add_special_tokens=False)) or [tok.eos_token_id]
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stop += [s for s in template.stop if s not in stop][: max(0, 4 - len(stop))]
    max_tokens = req.max_completion_tokens or req.max_tokens or max(1, state.resident.max_positions - len(ids))
    fields = {name: getattr(req, name) for name in SamplingFields.model_fields}
    plan, schema = structured.tool_plan(req)
    if plan is not None:
        if structured.grammar_spec(req) is not None:
            raise InvalidRequest("a tool call cannot also follow response_format or guided decoding",
                                 param="tool_choice")
        fields["guided_json"] = schema  # the tool call's arguments (or name and arguments) follow this
        stop = []  # the grammar ends the call; a template stop string must not cut it
    creq = CompletionRequest.model_construct(
        model=model, prompt=ids, max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, n=req.n, stop=stop or None,
        stream=req.stream, stream_options=req.stream_options, seed=req.seed,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None, logit_bias=req.logit_bias, echo=False,
        user=req.user, routing=req.routing, **fields)
    creq._tool_plan = plan
    last = req.messages[-1]
    creq._echo = _messages(req, limits.max_prompt_chars)[-1]["content"] if req.echo and last.role == "assistant" else ""
    return creq


def _message(creq: CompletionRequest, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
    """The assistant message and finish reason: text, or tool calls when the request forced them."""
    plan = creq._tool_plan
    if plan is None:
        return {"role": "assistant", "content": creq._echo + text}, finish_reason
    return ({"role": "assistant", "content": None, "tool_calls": structured.tool_calls(plan, text)},
            "tool_calls" if finish_reason == "stop" else finish_reason)


async def complete(creq: CompletionRequest, choices: list[completions.Choice], state: Services,
                   request: Request) -> dict:
    body = await completions.complete(creq, choices, state, request)
    decode = token_decoder(state, creq.return_tokens_as_token_ids)
    to_bytes = token_bytes(state.resident.tokenizer)
    out: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": body["created"],
        "model": creq.model,
        "choices": [{"index": ch["index"], "message": message,
                     "logprobs": chat_logprobs(decode, c.lp.entries, to_bytes) if c.lp is not None else None,
                     "finish_reason": finish, "routing": ch["routing"]}
                    for ch, c in zip(body["choices"], choices, strict=True)
                    for message, finish in [_message(creq, ch["text"], ch["finish_reason"])]],
        "usage": body["usage"],
    }
    if creq.prompt_logprobs is not None:  # vLLM: the rendered conversation's, once, beside `choices`
        out["prompt_logprobs"] = prompt_logprobs_body(choices[0], decode)
    return out


async def stream(creq: CompletionRequest, choices: list[completions.Choice], state: Services,
                 request: Request) -> AsyncIterator[str]:
    """The completions stream re-shaped into chat chunks: the first chunk of each choice carries
    the assistant role, each later one a content delta with its log-probs and routing weights."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    decode = token_decoder(state, creq.return_tokens_as_token_ids)
    to_bytes = token_bytes(state.resident.tokenizer)
    sent = [0] * len(choices)  # chat log-prob entries already sent, per choice
    plan: structured.ToolCallPlan | None = creq._tool_plan
    readers = [structured.CallReader() for _ in choices]  # "required": each choice's calls so far
    started = [False] * len(choices)

    def chunk(choice: dict[str, Any] | None, usage: dict | None = None) -> str:
        body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": creq.model,
                                "choices": [choice] if choice is not None else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    frames = completions.stream(creq, choices, state, request)
    try:
        async for frame in frames:
            payload = frame.removeprefix("data: ").strip()
            if payload == "[DONE]":
                yield frame
                continue
            body = json.loads(payload)
            if "error" in body:
                yield frame
                continue
            if not body["choices"]:
                yield chunk(None, body.get("usage"))
                continue
            ch = body["choices"][0]
            i = ch["index"]
            if not started[i]:
                started[i] = True
                yield chunk({"index": i, "delta": {"role": "assistant", "content": None if plan else creq._echo},
                             "logprobs": None, "finish_reason": None})
                if plan is not None and plan.name is not None:  # a named call: its id and name first
                    yield chunk({"index": i, "delta": {"tool_calls": [
                        {"index": 0, "id": structured.call_id(), "type": "function",
                         "function": {"name": plan.name, "arguments": ""}}]}, "logprobs": None, "finish_reason": None})
            lp = None
            c = choices[i]
            if c.lp is not None:
                lp = chat_logprobs(decode, c.lp.entries[sent[i]:], to_bytes)
                sent[i] = len(c.lp.entries)
            yield chunk({"index": i, "delta": _delta(plan, ch["text"], ch["finish_reason"], readers[i]), "logprobs": lp,
                         "finish_reason": _finish(plan, ch["finish_reason"]), "routing": ch["routing"]}, body.get("usage"))
    finally:  # a client that went away: the inner stream's cleanup cancels the rows now, not at GC
        await frames.aclose()


def _delta(plan: structured.ToolCallPlan | None, text: str, finish_reason: str | None,
           reader: structured.CallReader) -> dict[str, Any]:
    """A stream chunk's delta: content text; with a named tool call, argument text as a tool-call
    delta; with `"required"`, each call as one tool-call delta (`index` 0, 1, ...) as soon as its
    JSON object is complete (its name comes out of the JSON)."""
    if plan is None:
        return {"content": text} if text else {}
    if plan.name is not None:
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
    before = reader.sent
    calls = reader.feed(text)
    if finish_reason is not None and not reader.sent and not calls:  # cut short before one call was complete
        calls = structured.tool_calls(plan, reader.text)
    reader.sent += len(calls)
    return {"tool_calls": [{"index": before + k, **call} for k, call in enumerate(calls)]} if calls else {}


def _finish(plan: structured.ToolCallPlan | None, finish_reason: str | None) -> str | None:
    return "tool_calls" if plan is not None and finish_reason == "stop" else finish_reason
