"""Next-token choice per row: greedy, temperature, top-k, top-p, each row with its own generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's logit_bias: added to the logits before choosing

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator | None:
        """A per-request generator (seeded when `seed` is given); greedy needs none."""
        if self.greedy:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, float]:
    """Pick one token from `logits` [V]; returns (token id, its log-probability under the model)."""
    logits = logits.float()
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias, strict=True)
        logits = logits.index_add(0, torch.tensor(ids), torch.tensor(bias, dtype=logits.dtype))  # [V]
    logprobs = torch.log_softmax(logits, dim=-1)  # [V]
    if params.greedy:
        token = int(torch.argmax(logits))
        return token, float(logprobs[token])
    scaled = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the token that crosses top_p
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[tuple[int, float]]:
    """`sample_row` for every row of `logits` [B, V]; plain greedy rows (no logit_bias) are
    decided together in one argmax / log-softmax over the batch, on the logits' device."""
    plain = [i for i, p in enumerate(params) if p.greedy and not p.logit_bias]
    out: list[tuple[int, float] | None] = [None] * len(params)
    if plain:
        idx = torch.tensor(plain, device=logits.device)
        rows = logits.index_select(0, idx).float()  # [b, V]
        tokens = rows.argmax(dim=-1)  # [b]
        chosen = rows.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(rows, dim=-1)  # [b] log-probs
        for i, t, lp in zip(plain, tokens.tolist(), chosen.tolist(), strict=True):
            out[i] = (int(t), float(lp))
    for i, p in enumerate(params):
        if out[i] is None:
            out[i] = sample_row(logits[i].float().cpu(), p, generators[i])
    return [o for o in out if o is not None]
