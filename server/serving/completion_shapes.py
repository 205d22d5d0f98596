"""The shapes of `/v1/completions` answers: a request's rows (`Choice`) turned into OpenAI's
response body and stream chunks, with usage, log-probs and vLLM's `prompt_logprobs`.

Kept apart from `completion_service.py` (which turns a request into rows and waits on them) so
that what a client receives is read in one place; chat and LoRAX re-shape these bodies.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.api.schemas import CompletionRequest
from server.engine.sequence import Sequence, TokenEvent
from server.serving.logprobs import LogprobTrack, completion_logprobs, prompt_logprobs
from server.state import Services


@dataclass
class Choice:
    """One row of a request as it is collected into a response."""

    seq: Sequence
    queue: asyncio.Queue[TokenEvent]
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    lp: LogprobTrack | None = None  # when the request asked for log-probs
    echo: bool = False  # the prompt is returned before the completion
    copy: int = 0  # which of the prompt's candidates (`best_of`, else `n`) this is
    cumulative_logprob: float = 0.0  # of the sampled tokens: how `best_of` ranks the candidates
    prompt_top: int | None = None  # vLLM's `prompt_logprobs`: alternatives per prompt position


def candidates(req: CompletionRequest) -> int:
    """Rows sampled per prompt: `best_of` when it asks for more than `n` (validated), else `n`."""
    return max(req.n, getattr(req, "best_of", None) or req.n)


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


def token_decoder(state: Services, as_ids: bool | None = False) -> Callable[[int], str]:
    """A log-prob entry's token text; `as_ids` (vLLM's return_tokens_as_token_ids): 'token_id:<id>'."""
    if as_ids:
        return lambda token_id: f"token_id:{token_id}"
    tok = state.resident.tokenizer
    return lambda token_id: str(tok.decode([token_id]))


def usage(choices: list[Choice]) -> dict:
    """Every candidate's tokens count, as OpenAI bills `best_of`; each prompt once."""
    prompt = sum(len(c.seq.prompt_ids) for c in choices if c.copy == 0)
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def prompt_logprobs_body(c: Choice, decode: Callable[[int], str]) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs` of the choice's prompt, or None when the request did not ask."""
    if c.prompt_top is None or c.seq.prompt_scores is None:
        return None
    return prompt_logprobs(decode, c.seq.prompt_ids, c.seq.prompt_scores, c.prompt_top)


def completion_body(req: CompletionRequest, choices: list[Choice], state: Services) -> dict:
    """The whole answer once every row has finished."""
    decode = token_decoder(state, req.return_tokens_as_token_ids)
    body_choices = []
    for i, c in enumerate(best(choices, req.n, candidates(req))):
        choice: dict[str, Any] = {
            "index": i, "text": (c.seq.prompt_text if c.echo else "") + c.text,
            "logprobs": None if c.lp is None else completion_logprobs(decode, c.lp.entries)[0],
            "finish_reason": c.finish_reason, "routing": c.seq.segments()}
        if c.prompt_top is not None:
            choice["prompt_logprobs"] = prompt_logprobs_body(c, decode)
        body_choices.append(choice)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": req.model, "choices": body_choices, "usage": usage(choices)}


class StreamShaper:
    """The chunks of one completions stream: same id and creation time on every chunk, each
    choice's log-probs sent once (the echoed prompt's first, then each token's)."""

    def __init__(self, req: CompletionRequest, choices: list[Choice], state: Services) -> None:
        self.req, self.choices = req, choices
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.decode = token_decoder(state, req.return_tokens_as_token_ids)
        opts = req.stream_options
        self.continuous = bool(opts and opts.include_usage and opts.continuous_usage_stats)

    def _body(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.req.model,
                "choices": choices}

    def echo(self, i: int, c: Choice) -> dict:
        """The prompt, sent before the first token, with its log-probs."""
        lp = None
        if c.lp is not None:
            head = c.lp.entries[: len(c.seq.prompt_ids)]
            c.lp.sent = len(head)
            lp, c.lp.offset = completion_logprobs(self.decode, head, 0)
        return self._body([{"index": i, "text": c.seq.prompt_text, "logprobs": lp, "finish_reason": None}])

    def token(self, i: int, c: Choice, ev: TokenEvent) -> dict:
        """One token's chunk, with the weights in force (and the segments on the last one)."""
        lp = None
        if c.lp is not None:  # the tokens this chunk adds
            lp, c.lp.offset = completion_logprobs(self.decode, c.lp.unsent(), c.lp.offset)
        routing: dict[str, Any] = {"token_index": ev.token_index,
                                   "weights": {k: round(v, 4) for k, v in ev.weights.items()}}
        if ev.finish_reason is not None:
            routing["segments"] = c.seq.segments()
        body = self._body([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason,
                            "routing": routing}])
        if self.continuous:  # vLLM: the usage so far on every chunk
            body["usage"] = usage(self.choices)
        return body

    def usage(self) -> dict:
        """The last chunk with `stream_options.include_usage`: no choices, the usage."""
        return {**self._body([]), "usage": usage(self.choices)}
