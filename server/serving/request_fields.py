"""The sampling fields OpenAI and vLLM clients send beyond the basics, and what happens to fields
this server does not implement.

Policy (vLLM's): a field nobody here knows is accepted and logged once, so a client that sends
some new vendor option keeps working; a field that is known but not implemented (beam search,
`suffix`, ...) is a 400 naming it whenever its value would change the
output, because silently ignoring it would return something the client did not ask for.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from server.engine.errors import InvalidRequest
from server.engine.sampling import SamplingParams
from server.serving import lorax_fields

log = logging.getLogger(__name__)

MAX_N = 16  # choices per prompt (n); each one is a batch row
MAX_PROMPT_LOGPROBS = 20  # alternatives per prompt position (vLLM's default `max_logprobs`, OpenAI's top_logprobs bound)

# known but not implemented: the values that leave the output unchanged are accepted
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "early_stopping": (None, False),
    "functions": (None, []), "function_call": (None, "none"),
    "allowed_token_ids": (None,), "logits_processors": (None, []),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "continue_final_message": (None, False), "chat_template": (None,), "documents": (None, []),
}
_logged: set[str] = set()


def check_fields(req: BaseModel, n: int, ranks_candidates: bool = False) -> None:
    """400 for a known-but-unsupported field with an effective value; log unknown ones once.
    `ranks_candidates`: the endpoint implements `best_of` > n (legacy completions do, chat does not)."""
    for name, value in (req.model_extra or {}).items():
        if name in lorax_fields.FIELDS:  # served or refused by lorax_fields.adapter_for
            continue
        if name in UNSUPPORTED:
            if value not in UNSUPPORTED[name]:
                raise InvalidRequest(f"`{name}` is not supported by this server", param=name, code="unsupported_parameter")
        elif name not in _logged:
            _logged.add(name)
            log.warning("ignoring unknown request field %r (logged once per field)", name)
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"n must be between 1 and {MAX_N}", param="n")
    best_of = getattr(req, "best_of", None)
    if best_of is None or best_of == n:
        return
    if not ranks_candidates:
        raise InvalidRequest("best_of is a /v1/completions field; here it must equal n", param="best_of",
                             code="unsupported_parameter")
    if not n <= best_of <= MAX_N:
        raise InvalidRequest(f"best_of must be between n ({n}) and {MAX_N}", param="best_of")
    if getattr(req, "stream", False):
        raise InvalidRequest("best_of cannot be used with stream (the best candidates are known only at the end)",
                             param="best_of")


def check_prompt_logprobs(value: int | None, stream: bool) -> None:
    """vLLM's `prompt_logprobs`: 0..MAX_PROMPT_LOGPROBS alternatives per prompt position, and not
    with `stream` (vLLM refuses it there too). vLLM's -1 (the whole vocabulary) exceeds its default
    `max_logprobs` of 20 and is refused the same way here."""
    if value is None:
        return
    if value < 0 or value > MAX_PROMPT_LOGPROBS:
        raise InvalidRequest(f"prompt_logprobs must be an integer between 0 and {MAX_PROMPT_LOGPROBS} "
                             f"(got {value})", param="prompt_logprobs")
    if stream:
        raise InvalidRequest("`prompt_logprobs` are not available when `stream=True`", param="prompt_logprobs")


def sampling_params(req: Any, logit_bias: tuple[tuple[int, float], ...], top_logprobs: int, vocab: int,
                    eos_token_id: int | None) -> SamplingParams:
    """SamplingParams from a validated completions or chat request (`req` has the sampling fields)."""
    stop_ids = tuple(req.stop_token_ids or ())
    bad = [t for t in stop_ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(f"stop_token_ids {bad} are not token ids in [0, {vocab})", param="stop_token_ids")
    min_tokens = req.min_tokens or 0
    if min_tokens > req.max_tokens:
        raise InvalidRequest(f"min_tokens ({min_tokens}) must not exceed max_tokens ({req.max_tokens})", param="min_tokens")
    return SamplingParams(
        req.temperature, req.top_p, req.top_k, req.seed, logit_bias,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
        min_tokens=min_tokens, ignore_eos=bool(req.ignore_eos), stop_token_ids=stop_ids,
        eos_token_id=eos_token_id, top_logprobs=top_logprobs, min_p=req.min_p or 0.0)
