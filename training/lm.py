"""Tokenised language-model data sets, padding, and token-level loss / perplexity.

Kept apart from the Trainer code because evaluation (base vs adapter vs routed mixture)
and router training need exactly the same tokenisation and loss as adapter training:
a perplexity is only comparable when it is computed over the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.data import Example

IGNORE = -100


def default_max_length(model: nn.Module, requested: int | None = None) -> int:
    """``requested`` capped by the model's context (GPT-2: ``n_positions``)."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
    return int(min(requested or 512, limit))


def encode_example(
    ex: Example, tokenizer: Any, max_length: int, loss_on: str = "all"
) -> dict[str, list[int]]:
    """Token ids of ``prompt + completion + eos``; ``loss_on="completion"`` masks the prompt.

    The prompt and completion are tokenised separately and concatenated, so the prompt
    length in tokens is known exactly (the routed evaluation needs it).
    """
    prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    comp_ids = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] if ex.completion else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (prompt_ids + comp_ids + eos)[:max_length]
    labels = list(ids)
    if loss_on == "completion" and comp_ids:
        n = min(len(prompt_ids), len(ids))
        labels[:n] = [IGNORE] * n
    return {"input_ids": ids, "labels": labels, "prompt_len": min(len(prompt_ids), len(ids))}


class LMDataset(torch.utils.data.Dataset):
    """A list of encoded examples (small enough to hold in memory; LoRA data sets are)."""

    def __init__(
        self, examples: Sequence[Example], tokenizer: Any, max_length: int, loss_on: str = "all"
    ) -> None:
        if loss_on not in ("all", "completion"):
            raise ValueError("loss_on must be 'all' or 'completion'")
        pairs = [(ex, encode_example(ex, tokenizer, max_length, loss_on)) for ex in examples]
        pairs = [(ex, it) for ex, it in pairs if len(it["input_ids"]) >= 2]  # nothing to predict otherwise
        self.examples = [ex for ex, _ in pairs]
        self.items = [it for _, it in pairs]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class PadCollator:
    """Right-pads ``input_ids`` / ``labels``; extra tensor fields are stacked as they are."""

    def __init__(self, pad_id: int | None) -> None:
        self.pad_id = 0 if pad_id is None else int(pad_id)  # padded positions are masked anyway

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for key in batch[0]:
            if key not in out and isinstance(batch[0][key], Tensor):
                out[key] = torch.stack([b[key] for b in batch])
        return out


def shifted_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token NLL of next-token prediction: returns (sum over valid tokens, count)."""
    logits = logits[:, :-1].float()  # [B, T-1, V]
    target = labels[:, 1:]  # [B, T-1]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return nll, (target != IGNORE).sum()


@torch.no_grad()
def mean_token_nll(
    model: nn.Module,
    dataset: LMDataset,
    pad_id: int,
    batch_size: int = 8,
    before_batch: Callable[[list[int]], None] | None = None,
) -> float:
    """Mean NLL per predicted token over ``dataset`` (``exp`` of it is the perplexity).

    Token-weighted, unlike the Trainer's mean of batch means, so long and short examples
    count by their tokens and base / adapter / mixture numbers are comparable.
    ``before_batch(indices)`` lets the routed evaluation set per-position gates.
    """
    model.eval()
    device = next(model.parameters()).device
    collate = PadCollator(pad_id)
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        batch = collate([dataset[i] for i in idx])
        if before_batch is not None:
            before_batch(idx)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        nll, n = shifted_nll(logits, batch["labels"].to(device))
        total += float(nll)
        count += int(n)
    return total / max(count, 1)


def perplexity(nll: float) -> float:
    return float(math.exp(min(nll, 50.0)))
