"""Turning a validated `CompletionRequest` into engine sequences and OpenAI-shaped responses."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request

from server.engine.errors import (
    ContextTooLong,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    SwitchboardError,
)
from server.engine.registry import AdapterRegistry
from server.engine.sequence import RoutingSpec, Sequence, TokenEvent
from server.logprobs import LogprobTrack, completion_logprobs
from server.request_fields import check_fields, sampling_params
from server.schemas import CompletionRequest
from server.state import Services


@dataclass
class Choice:
    seq: Sequence
    queue: asyncio.Queue[TokenEvent]
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    lp: LogprobTrack | None = None  # when the request asked for log-probs
    echo: bool = False  # the prompt is returned before the completion
    copy: int = 0  # which of the prompt's `n` choices this is


def routing_spec(req: CompletionRequest, state: Services) -> tuple[RoutingSpec, list[str]]:
    """Decide how the request is routed and which adapters it must hold (404 for unknown names)."""
    opts = req.routing
    registry: AdapterRegistry = state.registry
    if req.model == "auto":
        if opts is not None and opts.weights is not None:
            return RoutingSpec("fixed", _manual_mixture(opts.weights, registry)), list(opts.weights)
        router, adapters = state.routing.resolve(opts.router if opts else None)
        every = opts.reroute_every if opts and opts.reroute_every is not None else state.settings.routing.reroute_every
        return RoutingSpec("auto", router=router, reroute_every=every,
                           top_k=opts.top_k if opts else None, temperature=opts.temperature if opts else None), adapters
    if opts is not None and (opts.weights or opts.router):
        raise InvalidRequest("`routing.weights` and `routing.router` need model 'auto'", param="routing")
    if req.model in (state.resident.model_id, "base", state.settings.model.base_model):
        return RoutingSpec("fixed", {}), []
    registry.get(req.model)  # 404 for an unknown adapter, never a silent fall-back to the base
    return RoutingSpec("fixed", {req.model: 1.0}), [req.model]


def _manual_mixture(weights: dict[str, float], registry: AdapterRegistry) -> dict[str, float]:
    if not weights:
        raise InvalidRequest("routing.weights is empty", param="routing.weights")
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise InvalidRequest(f"routing.weights[{name!r}] must be a finite number >= 0", param="routing.weights")
        registry.get(name)
    if sum(weights.values()) <= 0:
        raise InvalidRequest("routing.weights must not all be zero", param="routing.weights")
    return {k: float(v) for k, v in weights.items()}


def _prompts(req: CompletionRequest, state: Services) -> list[tuple[str, list[int]]]:
    tok = state.resident.tokenizer
    if isinstance(req.prompt, str):
        texts = [req.prompt]
    elif req.prompt and all(isinstance(p, int) for p in req.prompt):
        return [_token_prompt(req.prompt, tok)]  # type: ignore[arg-type]
    elif req.prompt and all(isinstance(p, list) for p in req.prompt):
        return [_token_prompt(p, tok) for p in req.prompt]  # type: ignore[arg-type]
    else:
        texts = [str(p) for p in req.prompt] or [""]
    out = []
    for text in texts:
        if len(text) > state.settings.server.max_prompt_chars:
            raise PayloadTooLarge(f"prompt has {len(text)} characters; the limit is "
                                  f"{state.settings.server.max_prompt_chars}", param="prompt")
        ids = tok.encode(text) or [tok.eos_token_id]  # an empty prompt starts from <|endoftext|>
        out.append((text, ids))
    return out


def _token_prompt(ids: list[int], tok) -> tuple[str, list[int]]:
    vocab = len(tok)
    if not ids or any(not 0 <= int(p) < vocab for p in ids):
        raise InvalidRequest(f"a token-id prompt needs at least one id, each in [0, {vocab})", param="prompt")
    ids = [int(p) for p in ids]
    return str(tok.decode(ids)), ids


def _logit_bias(req: CompletionRequest, state: Services) -> tuple[tuple[int, float], ...]:
    if not req.logit_bias:
        return ()
    vocab = len(state.resident.tokenizer)
    out = []
    for key, bias in req.logit_bias.items():
        if not key.isdigit() or int(key) >= vocab:
            raise InvalidRequest(f"logit_bias key {key!r} is not a token id in [0, {vocab})", param="logit_bias")
        if not -100 <= bias <= 100:
            raise InvalidRequest(f"logit_bias[{key}] must be in [-100, 100]", param="logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)


def build_choices(req: CompletionRequest, state: Services) -> list[Choice]:
    """Validate everything, then take adapter references and create the sequences (not yet submitted)."""
    check_fields(req, req.n)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4 or any(not s for s in stop):
        raise InvalidRequest("stop takes up to 4 non-empty strings", param="stop")
    spec, adapters = routing_spec(req, state)
    prompts = _prompts(req, state)
    limit = state.resident.max_positions
    for _, ids in prompts:
        if len(ids) + req.max_tokens > limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + req.max_tokens} tokens ({len(ids)} in the prompt, {req.max_tokens} in the completion).",
                param="max_tokens")
    tok = state.resident.tokenizer
    sampling = sampling_params(req, _logit_bias(req, state), req.logprobs or 0, len(tok), tok.eos_token_id)
    loop = asyncio.get_running_loop()
    choices = []
    for text, ids in prompts:
        for copy in range(req.n):
            versions = state.registry.acquire(adapters)
            queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
            seq = Sequence(
                prompt_ids=ids, max_tokens=req.max_tokens,
                sampling=replace(sampling, seed=sampling.seed + copy) if sampling.seed is not None else sampling,
                routing=spec, decode=lambda t: str(tok.decode(t, skip_special_tokens=True)),
                emit=_emitter(loop, queue),
                stop=stop, eos_token_id=tok.eos_token_id, prompt_text=text,
                versions={v.name: v for v in versions},
                prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
            )
            choices.append(Choice(seq, queue, lp=LogprobTrack() if req.logprobs is not None else None,
                                  echo=req.echo, copy=copy))
    return choices


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[TokenEvent]) -> Callable[[TokenEvent], None]:
    """Token events are produced on the engine thread and consumed on the event loop."""

    def emit(event: TokenEvent) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    return emit


def submit(choices: list[Choice], state: Services) -> None:
    submitted = []
    try:
        for c in choices:
            state.worker.submit(c.seq)
            submitted.append(c)
    except SwitchboardError:
        for c in submitted:
            state.worker.cancel(c.seq)
        for c in choices[len(submitted):]:
            state.registry.release(list(c.seq.versions.values()))
        raise


def _apply(choice: Choice, ev: TokenEvent, state: Services) -> None:
    if ev.error is not None:
        raise ev.error
    choice.text += ev.text
    if choice.lp is not None and ev.token_index == 0 and choice.seq.prompt_scores is not None and not choice.lp.entries:
        choice.lp.add_prompt(choice.seq.prompt_ids, choice.seq.prompt_scores)
    if ev.token_id is not None:
        choice.tokens += 1
        if choice.lp is not None and ev.logprob is not None:
            choice.lp.add(ev.token_id, ev.logprob, ev.top)
    choice.finish_reason = ev.finish_reason


async def _next_event(choice: Choice, request: Request, deadline: float) -> TokenEvent:
    while True:
        try:
            return await asyncio.wait_for(choice.queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone() from None
            if time.monotonic() > deadline:
                raise RequestTimeout("the request timed out") from None


class ClientGone(Exception):
    """The client disconnected; its rows are cancelled."""


def token_decoder(state: Services) -> Callable[[int], str]:
    tok = state.resident.tokenizer
    return lambda token_id: str(tok.decode([token_id]))


def _logprobs_body(c: Choice, state: Services) -> dict | None:
    return None if c.lp is None else completion_logprobs(token_decoder(state), c.lp.entries)[0]


def _usage(choices: list[Choice]) -> dict:
    prompt = sum(len(c.seq.prompt_ids) for c in choices if c.copy == 0)
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def complete(req: CompletionRequest, choices: list[Choice], state: Services, request: Request) -> dict:
    deadline = time.monotonic() + state.settings.engine.request_timeout
    try:
        for c in choices:
            while c.finish_reason is None:
                _apply(c, await _next_event(c, request, deadline), state)
    except BaseException:
        for c in choices:
            state.worker.cancel(c.seq)
        raise
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": req.model,
        "choices": [{"index": i, "text": (c.seq.prompt_text if c.echo else "") + c.text,
                     "logprobs": _logprobs_body(c, state), "finish_reason": c.finish_reason,
                     "routing": c.seq.segments()} for i, c in enumerate(choices)],
        "usage": _usage(choices),
    }


async def stream(req: CompletionRequest, choices: list[Choice], state: Services, request: Request) -> AsyncGenerator[str, None]:
    """SSE: one `data:` chunk per token carrying the weights in force, then `data: [DONE]`."""
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    deadline = time.monotonic() + state.settings.engine.request_timeout

    def chunk(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    decode = token_decoder(state)

    def logprobs(c: Choice) -> dict | None:  # the tokens this chunk adds
        if c.lp is None:
            return None
        body, c.lp.offset = completion_logprobs(decode, c.lp.unsent(), c.lp.offset)
        return body

    def echo_logprobs(c: Choice) -> dict | None:  # the prompt's tokens, sent before the first token's
        if c.lp is None:
            return None
        head = c.lp.entries[: len(c.seq.prompt_ids)]
        c.lp.sent = len(head)
        body, c.lp.offset = completion_logprobs(decode, head, 0)
        return body

    try:
        for i, c in enumerate(choices):
            while c.finish_reason is None:
                ev = await _next_event(c, request, deadline)
                try:
                    _apply(c, ev, state)
                except SwitchboardError as e:
                    yield chunk({"error": {"message": e.message, "type": e.error_type, "param": e.param, "code": e.code}})
                    return
                if c.echo and ev.token_index == 0:  # the prompt first, with its log-probs
                    yield chunk({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                                 "choices": [{"index": i, "text": c.seq.prompt_text, "logprobs": echo_logprobs(c),
                                              "finish_reason": None}]})
                choice: dict[str, Any] = {"index": i, "text": ev.text, "logprobs": logprobs(c), "finish_reason": ev.finish_reason,
                          "routing": {"token_index": ev.token_index, "weights": {k: round(v, 4) for k, v in ev.weights.items()}}}
                if ev.finish_reason is not None:
                    choice["routing"]["segments"] = c.seq.segments()
                yield chunk({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                             "choices": [choice]})
        if req.stream_options and req.stream_options.include_usage:
            yield chunk({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                         "choices": [], "usage": _usage(choices)})
        yield "data: [DONE]\n\n"
    finally:
        for c in choices:
            if c.finish_reason is None:
                state.worker.cancel(c.seq)
