"""Turning a validated `CompletionRequest` into engine sequences and collecting their tokens;
the response bodies and chunks are shaped in `completion_shapes.py`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
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
from server.serving.completion_shapes import Choice, StreamShaper, candidates, completion_body
from server.serving.logprobs import LogprobTrack
from server.serving.request_fields import check_fields, check_prompt_logprobs, sampling_params
from server.state import Services


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
    check_prompt_logprobs(req.prompt_logprobs, req.stream)
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
                        prompt_logprobs=_prompt_top(req),
                        grammar=grammars[len(choices)], include_stop_str=bool(req.include_stop_str_in_output),
                    )
                except BaseException:
                    state.registry.release(versions)
                    raise
                choices.append(Choice(seq, queue, lp=LogprobTrack() if req.logprobs is not None else None,
                                      echo=req.echo, copy=copy, prompt_top=req.prompt_logprobs))
    except BaseException:
        release(choices, state)
        raise
    return choices


def _prompt_top(req: CompletionRequest) -> int | None:
    """Alternatives the engine scores per prompt position, or None to not score the prompt: for
    `echo` with `logprobs` and for vLLM's `prompt_logprobs`, the larger of the two."""
    wanted = [n for n in (req.logprobs if req.echo else None, req.prompt_logprobs) if n is not None]
    return max(wanted) if wanted else None


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
    if choice.lp is not None and choice.echo and ev.token_index == 0 and choice.seq.prompt_scores is not None \
            and not choice.lp.entries:
        choice.lp.add_prompt(choice.seq.prompt_ids, choice.seq.prompt_scores, choice.seq.sampling.top_logprobs)
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
    return completion_body(req, choices, state)


async def stream(req: CompletionRequest, choices: list[Choice], state: Services,
                 request: Request) -> AsyncGenerator[str, None]:
    """SSE: one `data:` chunk per token carrying the weights in force, then `data: [DONE]`.
    Errors propagate; the route wraps this in `streaming.guarded`, which ends the stream with an
    error event and `[DONE]`."""
    shaper = StreamShaper(req, choices, state)
    deadline = request_deadline(request, state)

    def chunk(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    try:
        for i, c in enumerate(choices):
            while c.finish_reason is None:
                ev = await _next_event(c, request, deadline)
                _apply(c, ev, state)  # an error event raises: `streaming.guarded` ends the stream
                if c.echo and ev.token_index == 0:  # the prompt first, with its log-probs
                    yield chunk(shaper.echo(i, c))
                yield chunk(shaper.token(i, c, ev))
        if req.stream_options and req.stream_options.include_usage:
            yield chunk(shaper.usage())
        yield "data: [DONE]\n\n"
    finally:
        for c in choices:
            if c.finish_reason is None:
                state.worker.cancel(c.seq)
