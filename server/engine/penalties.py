"""Per-row logits processors: the penalties, `min_tokens` and `bad_words` of OpenAI's and vLLM's APIs.

Where transformers has the processor (`RepetitionPenaltyLogitsProcessor`,
`MinNewTokensLengthLogitsProcessor`) it is used as is, so `repetition_penalty` and `min_tokens`
mean exactly what they mean in `model.generate()`. OpenAI's `presence_penalty` and
`frequency_penalty` have no transformers processor; they follow OpenAI's published formula
    logits[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)
over the tokens generated so far (not the prompt), as vLLM applies them.
"""

from __future__ import annotations

import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)


def openai_penalties(scores: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """scores [1, V] -> scores [1, V] with OpenAI's presence/frequency penalties over `generated`."""
    if not generated:
        return scores
    counts = torch.bincount(torch.tensor(generated), minlength=scores.shape[-1])[: scores.shape[-1]]  # [V]
    counts = counts.to(scores.dtype)
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def apply_penalties(logits: torch.Tensor, prompt_ids: list[int], generated: list[int], *,
                    repetition: float = 1.0, presence: float = 0.0, frequency: float = 0.0,
                    min_tokens: int = 0, held_back: tuple[int, ...] = ()) -> torch.Tensor:
    """One row's logits [V] after `repetition_penalty` (over prompt + generated, as transformers
    does), presence/frequency penalties, and the `min_tokens` mask on the `held_back` ids (EOS and
    `stop_token_ids`)."""
    scores = logits[None]  # [1, V]: transformers' processors take a batch
    ids = torch.tensor([prompt_ids + generated], dtype=torch.long)  # [1, L]
    if repetition != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(repetition)(ids, scores)
    if presence or frequency:
        scores = openai_penalties(scores, generated, presence, frequency)
    if min_tokens and len(generated) < min_tokens and held_back:
        scores = MinNewTokensLengthLogitsProcessor(len(prompt_ids), min_tokens, list(held_back))(ids, scores)
    return scores[0]


def ban_words(logits: torch.Tensor, prompt_ids: list[int], generated: list[int],
              words: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """vLLM's `bad_words` through transformers' `NoBadWordsLogitsProcessor`: a one-token word is
    never generated; a longer one never completes (its last token is banned after its prefix)."""
    ids = torch.tensor([prompt_ids + generated], dtype=torch.long)  # [1, L]
    return NoBadWordsLogitsProcessor([list(w) for w in words])(ids, logits[None])[0]
