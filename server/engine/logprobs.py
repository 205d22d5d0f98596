"""Prompt log-probabilities (OpenAI's `echo` with `logprobs`, how evaluation harnesses score text).

The prefill already computes every prompt position's final hidden state under the row's gates;
the LM head over those positions gives, at position t, the distribution of token t+1. So scoring
a prompt costs one extra [T, d] x [d, V] matmul for that row, and no extra forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2LMHeadModel

from server.engine import gpt2
from server.engine.sampling import Top


@dataclass(frozen=True)
class PromptScores:
    """Per prompt token: its log-prob given the tokens before it (None for the first) and the
    top-N alternatives at that position (None for the first)."""

    logprobs: list[float | None]
    top: list[Top | None]


def score_prompt(model: GPT2LMHeadModel, hidden: torch.Tensor, ids: list[int], top_n: int) -> PromptScores:
    """`hidden` [T, d]: the final hidden states of the prompt `ids` (len T)."""
    if len(ids) < 2:
        return PromptScores([None] * len(ids), [None] * len(ids))
    logits = gpt2.lm_head(model, hidden[:-1]).float()  # [T-1, V]: position t predicts token t+1
    logprobs = torch.log_softmax(logits, dim=-1)  # [T-1, V]
    targets = torch.tensor(ids[1:], device=logprobs.device)  # [T-1]
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()  # [T-1]
    tops: list[Top | None] = [None]
    if top_n > 0:
        values, top_ids = torch.topk(logprobs, min(top_n, logprobs.shape[-1]))  # [T-1, n]
        tops += [tuple(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)]
    else:
        tops += [None] * (len(ids) - 1)
    return PromptScores([None, *chosen], tops)
