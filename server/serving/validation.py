"""Request checks at the edge that a JSON schema cannot state: numbers that are in range but not
representable once they reach the engine, text that is not encodable, and counts with limits
from the settings.

Everything the engine computes per row is bounded here first, so a hostile number is a 400 for
its own request instead of a NaN inside a shared batch: temperatures and top_p below a floor
divide or compare to nothing in float32, seeds past 2**64 do not fit a torch generator, and
mixture weights multiply LoRA deltas in the serving dtype (fp16's largest value is 65504).
"""

from __future__ import annotations

import re
from typing import Any

from server.engine.errors import InvalidRequest, SwitchboardError

MIN_TEMPERATURE = 0.01  # 0 is greedy; between 0 and this, logits / T overflows float32
MIN_TOP_P = 1e-3  # below float32's resolution near 0 top_p drops every token
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MAX_MIXTURE_WEIGHT = 10.0  # a gate this large times a bounded adapter scale stays finite in fp16
TOKEN_ID = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also accepts '²'


class PayloadTooLarge(SwitchboardError):
    status_code = 413
    code = "prompt_too_large"


def check_text(text: str, param: str) -> str:
    """Refuse strings the tokenizer cannot take: lone UTF-16 surrogates (JSON `"\\ud800"`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"{param} is not valid Unicode text (character {e.start} is a lone surrogate)",
                             param=param) from None
    return text


def check_sampling(temperature: float, top_p: float, seed: int | None) -> None:
    if 0 < temperature < MIN_TEMPERATURE:
        raise InvalidRequest(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}", param="temperature")
    if top_p < MIN_TOP_P:
        raise InvalidRequest(f"top_p must be at least {MIN_TOP_P}", param="top_p")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be in [0, 2**64 - 1], got {seed}", param="seed")


def check_prompt_count(prompt: object, limit: int) -> None:
    """A list of strings (or of token-id lists) is one request per prompt; bound it before tokenising any."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and len(prompt) > limit:
        raise PayloadTooLarge(f"{len(prompt)} prompts in one request; the limit is {limit}", param="prompt")


def check_stop(stop: tuple[str, ...], max_chars: int) -> tuple[str, ...]:
    if len(stop) > 4 or any(not s for s in stop):
        raise InvalidRequest("stop takes up to 4 non-empty strings", param="stop")
    for s in stop:
        if len(s) > max_chars:
            raise InvalidRequest(f"a stop string has {len(s)} characters; the limit is {max_chars}", param="stop")
        check_text(s, "stop")
    return stop


def check_mixture_weight(name: str, weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= MAX_MIXTURE_WEIGHT:
        raise InvalidRequest(f"routing.weights[{name!r}] must be a number in [0, {MAX_MIXTURE_WEIGHT:g}]",
                             param="routing.weights")
    return float(weight)


def token_limit(tokenizer_size: int, model: Any) -> int:
    """How many token ids a request may use: the tokenizer's and the model's embedding table's
    sizes, whichever is smaller. A tokenizer with added tokens can be larger than the table, and
    an id past the table is a device-side assert on CUDA, which poisons the CUDA context: every
    later request fails while /health stays green. So an id is checked here, at the edge."""
    rows = int(model.get_input_embeddings().weight.shape[0])
    return min(tokenizer_size, rows)


def token_id_key(key: str, vocab: int) -> int:
    """A logit_bias key: a token id as ASCII digits, below the vocabulary size."""
    if not TOKEN_ID.fullmatch(key) or int(key) >= vocab:
        raise InvalidRequest(f"logit_bias key {key[:20]!r} is not a token id in [0, {vocab})", param="logit_bias")
    return int(key)
