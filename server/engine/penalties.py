"""Per-row logits processors: the penalties and `min_tokens` of OpenAI's and vLLM's APIs.

Where transformers has the processor (`RepetitionPenaltyLogitsProcessor`,
`MinNewTokensLengthLogitsProcessor`) it is used as is, so `repetition_penalty` and `min_tokens`
mean exactly what they mean in `model.generate()`. OpenAI's `presence_penalty` and
`frequency_penalty` have no transformers processor; they follow OpenAI's published formula
    logits[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)
over the tokens generated so far (not the prompt), as vLLM applies them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

if TYPE_CHECKING:
    from server.engine.sampling import SamplingParams


def needs_processing(params: SamplingParams) -> bool:
    return bool(params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
                or params.min_tokens)


def openai_penalties(scores: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """scores [1, V] -> scores [1, V] with OpenAI's presence/frequency penalties over `generated`."""
    if not generated:
        return scores
    counts = torch.bincount(torch.tensor(generated), minlength=scores.shape[-1])[: scores.shape[-1]]  # [V]
    counts = counts.to(scores.dtype)
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    generated: list[int]) -> torch.Tensor:
    """One row's logits [V] after `repetition_penalty` (over prompt + generated, as transformers
    does), presence/frequency penalties, and the `min_tokens` mask on EOS and `stop_token_ids`."""
    scores = logits[None]  # [1, V]: transformers' processors take a batch
    ids = torch.tensor([prompt_ids + generated], dtype=torch.long)  # [1, L]
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    if params.presence_penalty or params.frequency_penalty:
        scores = openai_penalties(scores, generated, params.presence_penalty, params.frequency_penalty)
    if params.min_tokens and len(generated) < params.min_tokens:
        blocked = list(params.stop_token_ids)
        if params.eos_token_id is not None and not params.ignore_eos:
            blocked.append(params.eos_token_id)
        if blocked:
            scores = MinNewTokensLengthLogitsProcessor(len(prompt_ids), params.min_tokens, blocked)(ids, scores)
    return scores[0]
