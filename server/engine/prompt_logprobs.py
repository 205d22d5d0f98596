"""Prompt log-probabilities (OpenAI's `echo` with `logprobs`, how evaluation harnesses score text;
vLLM's `prompt_logprobs`).

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
    """Per prompt token: its log-prob given the tokens before it (None for the first), the
    top-N alternatives at that position, most likely first (None for the first), and its rank
    (1 = the most likely; vLLM's: how many tokens are at least as likely, itself included)."""

    logprobs: list[float | None]
    top: list[Top | None]
    ranks: list[int | None]


CHUNK = 256  # positions per LM-head pass: bounds the [chunk, V] fp32 logits (GPT-2: ~50 MB)


def score_prompt(model: GPT2LMHeadModel, hidden: torch.Tensor, ids: list[int], top_n: int) -> PromptScores:
    """`hidden` [T, d]: the final hidden states of the prompt `ids` (len T)."""
    chosen: list[float | None] = [None]
    tops: list[Top | None] = [None]
    ranks: list[int | None] = [None]
    for start in range(0, len(ids) - 1, CHUNK):
        end = min(start + CHUNK, len(ids) - 1)
        logits = gpt2.lm_head(model, hidden[start:end]).float()  # [c, V]: position t predicts token t+1
        logprobs = torch.log_softmax(logits, dim=-1)  # [c, V]
        targets = torch.tensor(ids[start + 1:end + 1], device=logprobs.device)  # [c]
        picked = logprobs.gather(1, targets[:, None])  # [c, 1]
        chosen += picked[:, 0].tolist()
        ranks += (logprobs >= picked).sum(-1).tolist()
        if top_n > 0:
            values, top_ids = torch.topk(logprobs, min(top_n, logprobs.shape[-1]))  # [c, n]
            tops += [tuple(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)]
        else:
            tops += [None] * (end - start)
    return PromptScores(chosen, tops, ranks)
