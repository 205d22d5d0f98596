"""Turning a validated `CompletionRequest` into engine sequences and OpenAI-shaped responses."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request

from server.api.schemas import CompletionRequest
from server.engine.errors import (
    ContextTooLong,
    InvalidRequest,
    RequestTimeout,
)
from server.engine.registry import AdapterRegistry
from server.engine.sequence import RoutingSpec, Sequence, TokenEvent
from server.serving import fair_pool, lorax_fields, structured, validation
from server.serving.logprobs import LogprobTrack, completion_logprobs
from server.serving.request_fields import check_fields, sampling_params
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
    copy: int = 0  # which of the prompt's candidates (`best_of`, else `n`) this is
    cumulative_logprob: float = 0.0  # of the sampled tokens: how `best_of` ranks the candidates


def candidates(req: CompletionRequest) -> int:
    """Rows sampled per prompt: `best_of` when it asks for more than `n` (validated), else `n`."""
    return max(req.n, getattr(req, "best_of", None) or req.n)


def routing_spec(req: CompletionRequest, state: Services) -> tuple[RoutingSpec, list[str]]:
    """Decide how the request is routed and which adapters it must hold (404 for unknown names)."""
    opts = req.routing
    registry: AdapterRegistry = state.registry
    if req.model == "auto":
        if opts is not None and opts.weights is not None:
            return RoutingSpec("fixed", _manual_mixture(opts.weights, registry)), list(opts.weights)
        router, adapters = state.routing.resolve(opts.router if opts else None)
        every = state.routing.policy.cadence(opts.reroute_every if opts else None)
        top_k, temperature = (opts.top_k, opts.temperature) if opts else (None, None)
        return RoutingSpec("auto", router=router, reroute_every=every, top_k=top_k, temperature=temperature,
                           per_token=state.routing.per_token(router, top_k, temperature)), adapters
    if opts is not None and (opts.weights or opts.router):
        raise InvalidRequest("`routing.weights` and `routing.router` need model 'auto'", param="routing")
    if req.model in base_names(state):
        return RoutingSpec("fixed", {}), []
    registry.get(req.model)  # 404 for an unknown adapter, never a silent fall-back to the base
    return RoutingSpec("fixed", {req.model: 1.0}), [req.model]


def base_names(state: Services) -> set[str]:
    """The names that mean the resident model alone."""
    return {state.resident.model_id, "base", state.settings.model.base_model}


def _manual_mixture(weights: dict[str, float], registry: AdapterRegistry) -> dict[str, float]:
    if not weights:
        raise InvalidRequest("routing.weights is empty", param="routing.weights")
    out = {name: validation.check_mixture_weight(name, w) for name, w in weights.items()}
    for name in out:
        registry.get(name)
    if sum(out.values()) <= 0:
        raise InvalidRequest("routing.weights must not all be zero", param="routing.weights")
    return out


def _prompts(req: CompletionRequest, state: Services) -> list[tuple[str, list[int]]]:
    """Each prompt as (text, token ids). The cheap bounds come first, so a heavy body is refused
    before any of it is tokenised: each text's characters, all texts' characters together, and
    the length of token-id prompts (before their ids are checked or decoded); then each text is
    tokenised and its context length checked at once, so the first prompt that is too long ends
    the work."""
    tok, limits = state.resident.tokenizer, state.settings.server
    limit = state.resident.max_positions
    if isinstance(req.prompt, str):
        texts = [req.prompt]
    elif req.prompt and all(isinstance(p, int) for p in req.prompt):
        return [_token_prompt(req.prompt, tok, vocab_size(state), limit, req.max_tokens)]  # type: ignore[arg-type]
    elif req.prompt and all(isinstance(p, list) for p in req.prompt):
        return [_token_prompt(p, tok, vocab_size(state), limit, req.max_tokens) for p in req.prompt]  # type: ignore[arg-type]
    else:
        texts = [str(p) for p in req.prompt] or [""]
    total = 0
    for text in texts:
        if len(text) > limits.max_prompt_chars:
            raise validation.PayloadTooLarge(f"prompt has {len(text)} characters; the limit is "
                                             f"{limits.max_prompt_chars}", param="prompt")
        total += len(text)
        if total > limits.max_request_chars:
            raise validation.PayloadTooLarge(f"the prompts have more than {limits.max_request_chars} characters "
                                             "together (max_request_chars)", param="prompt")
        validation.check_text(text, "prompt")
    out = []
    for text in texts:  # each prompt in this request's turn on the shared tokenising threads
        ids = fair_pool.TOKENISE.run(id(req), tok.encode, text) or [tok.eos_token_id]  # empty: <|endoftext|>
        if req.truncate_prompt_tokens is not None:  # vLLM: only the last k tokens count (and are checked)
            ids = ids[-req.truncate_prompt_tokens:]
        _check_context(len(ids), req.max_tokens, limit)
        out.append((text, ids))
    return out


def _check_context(prompt_tokens: int, max_tokens: int, limit: int) -> None:
    if prompt_tokens + max_tokens > limit:
        raise ContextTooLong(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion).",
            param="max_tokens")


def _token_prompt(ids: list[int], tok, vocab: int, limit: int, max_tokens: int) -> tuple[str, list[int]]:
    if ids:
        _check_context(len(ids), max_tokens, limit)  # before a million ids are range-checked or decoded
    if not ids or any(not 0 <= int(p) < vocab for p in ids):
        raise InvalidRequest(f"a token-id prompt needs at least one id, each in [0, {vocab})", param="prompt")
    ids = [int(p) for p in ids]
    return str(tok.decode(ids)), ids


def vocab_size(state: Services) -> int:
    """Token ids a request may use (`validation.token_limit`)."""
    return validation.token_limit(len(state.resident.tokenizer), state.resident.model)


def _logit_bias(req: CompletionRequest, state: Services) -> tuple[tuple[int, float], ...]:
    if not req.logit_bias:
        return ()
    vocab = vocab_size(state)
    out = []
    for key, bias in req.logit_bias.items():
        token = validation.token_id_key(key, vocab)
        if not -100 <= bias <= 100:
            raise InvalidRequest(f"logit_bias[{key}] must be in [-100, 100]", param="logit_bias")
        out.append((token, float(bias)))
    return tuple(out)


def request_deadline(request: Request, state: Services) -> float:
    """`request_timeout` after the request arrived (the edge stamps the arrival before the body is
    read), so parsing, validation, tokenising, queueing and generation all count against it."""
    deadline = getattr(request.state, "deadline", None)
    if deadline is None:
        arrival = getattr(request.state, "arrival", None)
        deadline = (arrival if arrival is not None else time.monotonic()) + state.settings.engine.request_timeout
        request.state.deadline = deadline
    return deadline


def build_choices(req: CompletionRequest, state: Services,
                  loop: asyncio.AbstractEventLoop | None = None, deadline: float | None = None) -> list[Choice]:
    """Validate everything, then take adapter references and create the sequences (not yet
    submitted). Tokenising is the heavy part: the route runs this on a worker thread, passing
    its event loop. The request owns the references until `submit` hands them to the engine;
    if anything here fails, the ones taken so far are released before the error leaves."""
    check_fields(req, req.n, ranks_candidates=True)
    model = lorax_fields.adapter_for(req.model, req.model_extra, base_names(state))
    if model != req.model:
        req = req.model_copy(update={"model": model})
    limits = state.settings.server
    stop = validation.check_stop((req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ()),
                                 limits.max_stop_chars)
    validation.check_sampling(req.temperature, req.top_p, req.seed)
    validation.check_prompt_count(req.prompt, limits.max_prompts)
    spec, adapters = routing_spec(req, state)
    prompts = _prompts(req, state)
    if req.truncate_prompt_tokens is not None:  # vLLM: the prompt's last k tokens
        tok = state.resident.tokenizer
        prompts = [(t if len(ids) <= req.truncate_prompt_tokens else str(tok.decode(ids[-req.truncate_prompt_tokens:])),
                    ids[-req.truncate_prompt_tokens:]) for t, ids in prompts]
    tok = state.resident.tokenizer
    sampling = sampling_params(req, _logit_bias(req, state), req.logprobs or 0, vocab_size(state), tok.eos_token_id)
    if req.bad_words:
        sampling = replace(sampling, bad_words=_bad_words(req.bad_words, tok))
    skip_special = req.skip_special_tokens is not False
    constraint = structured.grammar_spec(req)
    if constraint is not None and sampling.min_tokens:
        raise InvalidRequest("min_tokens cannot be combined with structured output (the grammar decides "
                             "where the output ends)", param="min_tokens")
    grammars = structured.row_grammars(constraint, state, len(prompts) * candidates(req))
    loop = loop or asyncio.get_running_loop()
    if deadline is None:
        deadline = time.monotonic() + state.settings.engine.request_timeout
    choices: list[Choice] = []
    try:
        for text, ids in prompts:
            for copy in range(candidates(req)):
                versions = state.registry.acquire(adapters)
                try:
                    if spec.mode != "auto":  # read factors still on disk here, off the engine thread
                        for v in versions:
                            state.registry.host.tensors(v)
                    queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
                    seq = Sequence(
                        prompt_ids=ids, max_tokens=req.max_tokens,
                        sampling=replace(sampling, seed=sampling.seed + copy) if sampling.seed is not None else sampling,
                        routing=spec, decode=lambda t: str(tok.decode(t, skip_special_tokens=skip_special)),
                        emit=_emitter(loop, queue),
                        stop=stop, eos_token_id=tok.eos_token_id, prompt_text=text,
                        versions={v.name: v for v in versions}, deadline=deadline,
                        prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
                        grammar=grammars[len(choices)], include_stop_str=bool(req.include_stop_str_in_output),
                    )
                except BaseException:
                    state.registry.release(versions)
                    raise
                choices.append(Choice(seq, queue, lp=LogprobTrack() if req.logprobs is not None else None,
                                      echo=req.echo, copy=copy))
    except BaseException:
        release(choices, state)
        raise
    return choices


def _bad_words(words: list[str], tok: Any) -> tuple[tuple[int, ...], ...]:
    """vLLM's `bad_words`: each word's tokens as written and with a leading space (how it appears
    after another word)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        validation.check_text(word, "bad_words")
        for text in (word, " " + word.lstrip()):
            ids = tuple(tok.encode(text, add_special_tokens=False))
            if ids and ids not in out:
                out.append(ids)
    return tuple(out)


def release(choices: list[Choice], state: Services) -> None:
    """Release the references of choices the engine never accepted (idempotent per sequence)."""
    for c in choices:
        c.seq.release_references(state.registry)


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
    except BaseException:
        for c in submitted:  # the engine owns these now: it releases them when it drops them
            state.worker.cancel(c.seq)
        release(choices[len(submitted):], state)
        raise


def _apply(choice: Choice, ev: TokenEvent, state: Services) -> None:
    if ev.error is not None:
        raise ev.error
    choice.text += ev.text
    if choice.lp is not None and ev.token_index == 0 and choice.seq.prompt_scores is not None and not choice.lp.entries:
        choice.lp.add_prompt(choice.seq.prompt_ids, choice.seq.prompt_scores)
    if ev.token_id is not None:
        choice.tokens += 1
        choice.cumulative_logprob += ev.logprob or 0.0
        if choice.lp is not None and ev.logprob is not None:
            choice.lp.add(ev.token_id, ev.logprob, ev.top)
    choice.finish_reason = ev.finish_reason


DISCONNECT_POLL = 0.5  # seconds between checks that the client is still there


async def _next_event(choice: Choice, request: Request, deadline: float) -> TokenEvent:
    """The next token event; checks the client and the deadline at least every DISCONNECT_POLL
    seconds, whether or not tokens keep arriving (the engine enforces the deadline too)."""
    checked = getattr(request.state, "disconnect_checked", None)
    if checked is None or time.monotonic() - checked >= DISCONNECT_POLL:
        request.state.disconnect_checked = time.monotonic()
        if await request.is_disconnected():
            raise ClientGone()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeout("the request timed out")
        try:
            return await asyncio.wait_for(choice.queue.get(), timeout=min(DISCONNECT_POLL, left))
        except asyncio.TimeoutError:
            request.state.disconnect_checked = time.monotonic()
            if await request.is_disconnected():
                raise ClientGone() from None


class ClientGone(Exception):
    """The client disconnected; its rows are cancelled."""


def token_decoder(state: Services, as_ids: bool | None = False) -> Callable[[int], str]:
    """A log-prob entry's token text; `as_ids` (vLLM's return_tokens_as_token_ids): 'token_id:<id>'."""
    if as_ids:
        return lambda token_id: f"token_id:{token_id}"
    tok = state.resident.tokenizer
    return lambda token_id: str(tok.decode([token_id]))


def _logprobs_body(c: Choice, state: Services, as_ids: bool | None) -> dict | None:
    return None if c.lp is None else completion_logprobs(token_decoder(state, as_ids), c.lp.entries)[0]


def _usage(choices: list[Choice]) -> dict:
    prompt = sum(len(c.seq.prompt_ids) for c in choices if c.copy == 0)
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def complete(req: CompletionRequest, choices: list[Choice], state: Services, request: Request) -> dict:
    deadline = request_deadline(request, state)
    try:
        for c in choices:
            while c.finish_reason is None:
                _apply(c, await _next_event(c, request, deadline), state)
    except BaseException:
        for c in choices:
            state.worker.cancel(c.seq)
        raise
    usage = _usage(choices)  # every candidate's tokens count, as OpenAI bills best_of
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": req.model,
        "choices": [{"index": i, "text": (c.seq.prompt_text if c.echo else "") + c.text,
                     "logprobs": _logprobs_body(c, state, req.return_tokens_as_token_ids), "finish_reason": c.finish_reason,
                     "routing": c.seq.segments()} for i, c in enumerate(best(choices, req.n, candidates(req)))],
        "usage": usage,
    }


def best(choices: list[Choice], n: int, per_prompt: int) -> list[Choice]:
    """The `n` of each prompt's `per_prompt` candidates (consecutive in `choices`) with the highest
    cumulative log-probability, in prompt order (vLLM's `best_of` ranking; ties keep sampling
    order). With no extra candidates, all of them as they are."""
    if per_prompt <= n:
        return choices
    out: list[Choice] = []
    for start in range(0, len(choices), per_prompt):
        out += sorted(choices[start:start + per_prompt], key=lambda c: -c.cumulative_logprob)[:n]
    return out


async def stream(req: CompletionRequest, choices: list[Choice], state: Services,
                 request: Request) -> AsyncGenerator[str, None]:
    """SSE: one `data:` chunk per token carrying the weights in force, then `data: [DONE]`.
    Errors propagate; the route wraps this in `streaming.guarded`, which ends the stream with an
    error event and `[DONE]`."""
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    deadline = request_deadline(request, state)

    def chunk(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    decode = token_decoder(state, req.return_tokens_as_token_ids)
    continuous = bool(req.stream_options and req.stream_options.include_usage
                      and req.stream_options.continuous_usage_stats)

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
                _apply(c, ev, state)  # an error event raises: `streaming.guarded` ends the stream
                if c.echo and ev.token_index == 0:  # the prompt first, with its log-probs
                    yield chunk({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                                 "choices": [{"index": i, "text": c.seq.prompt_text, "logprobs": echo_logprobs(c),
                                              "finish_reason": None}]})
                choice: dict[str, Any] = {"index": i, "text": ev.text, "logprobs": logprobs(c), "finish_reason": ev.finish_reason,
                          "routing": {"token_index": ev.token_index, "weights": {k: round(v, 4) for k, v in ev.weights.items()}}}
                if ev.finish_reason is not None:
                    choice["routing"]["segments"] = c.seq.segments()
                body = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                        "choices": [choice]}
                if continuous:  # vLLM: the usage so far on every chunk
                    body["usage"] = _usage(choices)
                yield chunk(body)
        if req.stream_options and req.stream_options.include_usage:
            yield chunk({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                         "choices": [], "usage": _usage(choices)})
        yield "data: [DONE]\n\n"
    finally:
        for c in choices:
            if c.finish_reason is None:
                state.worker.cancel(c.seq)
