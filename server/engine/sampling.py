"""Next-token choice per row: penalties, greedy, temperature, top-k, top-p, each row with its own
generator; plus the top-N log-probabilities a request asked for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import MinPLogitsWarper

from server.engine.errors import RowFailed, SwitchboardError
from server.engine.penalties import apply_penalties, ban_words

Top = tuple[tuple[int, float], ...]  # (token id, log-prob), most likely first


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's logit_bias: added to the logits before choosing
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    eos_token_id: int | None = None  # what `min_tokens` holds back (with `stop_token_ids`)
    top_logprobs: int = 0  # return this many most likely tokens per step
    min_p: float = 0.0  # vLLM: drop tokens less likely than min_p times the most likely (after temperature)
    bad_words: tuple[tuple[int, ...], ...] = ()  # vLLM: token sequences never generated

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.min_tokens or self.bad_words)

    @property
    def plain(self) -> bool:
        """No per-row logits processing: the batched greedy path can decide it."""
        return self.greedy and not self.logit_bias and not self.penalised

    @property
    def held_back(self) -> tuple[int, ...]:
        """What `min_tokens` masks: `stop_token_ids`, and EOS unless it is ignored anyway."""
        eos = (self.eos_token_id,) if self.eos_token_id is not None and not self.ignore_eos else ()
        return (*self.stop_token_ids, *eos)

    def make_generator(self) -> torch.Generator | None:
        """A per-request generator (seeded when `seed` is given); greedy needs none."""
        if self.greedy:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


class Pick(NamedTuple):
    token: int
    logprob: float  # of `token` under the processed distribution (after bias and penalties, before temperature)
    top: Top | None = None


def _top(logprobs: torch.Tensor, n: int) -> Top | None:
    if n <= 0:
        return None
    values, ids = torch.topk(logprobs, min(n, logprobs.shape[-1]))
    return tuple(zip(ids.tolist(), values.tolist(), strict=True))


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
               prompt_ids: list[int] | None = None, generated: list[int] | None = None) -> Pick:
    """Pick one token from `logits` [V]; `prompt_ids`/`generated` feed the penalties."""
    logits = logits.float()
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias, strict=True)
        logits = logits.index_add(0, torch.tensor(ids), torch.tensor(bias, dtype=logits.dtype))  # [V]
    if params.penalised:
        logits = apply_penalties(logits, prompt_ids or [], generated or [], repetition=params.repetition_penalty,
                                 presence=params.presence_penalty, frequency=params.frequency_penalty,
                                 min_tokens=params.min_tokens, held_back=params.held_back)
    if params.bad_words:
        logits = ban_words(logits, prompt_ids or [], generated or [], params.bad_words)
    logprobs = torch.log_softmax(logits, dim=-1)  # [V]
    top = _top(logprobs, params.top_logprobs)
    if params.greedy:
        token = int(torch.argmax(logits))
        return Pick(token, float(logprobs[token]), top)
    scaled = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the token that crosses top_p
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        scaled = MinPLogitsWarper(params.min_p)(None, scaled[None])[0]  # type: ignore[arg-type]
    probs = torch.softmax(scaled, dim=-1)
    token = int(torch.multinomial(probs, 1, generator=generator))
    return Pick(token, float(logprobs[token]), top)


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 histories: list[tuple[list[int], list[int]]] | None = None) -> list[Pick | SwitchboardError]:
    """`sample_row` for every row of `logits` [B, V] (`histories`: each row's prompt and generated
    ids, for the penalties). Plain greedy rows are decided together in one argmax / log-softmax over
    the batch, on the logits' device. A row whose processing raises gets a `RowFailed` in its
    place: one request's failure never takes the others down."""
    plain = [i for i, p in enumerate(params) if p.plain]
    out: list[Pick | SwitchboardError | None] = [None] * len(params)
    if plain:
        idx = torch.tensor(plain, device=logits.device)
        rows = logits.index_select(0, idx).float()  # [b, V]
        tokens = rows.argmax(dim=-1)  # [b]
        chosen = rows.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(rows, dim=-1)  # [b] log-probs
        want = max(params[i].top_logprobs for i in plain)
        tops: list[Top | None] = [None] * len(plain)
        if want:
            values, ids = torch.topk(rows.log_softmax(dim=-1), min(want, rows.shape[-1]))  # [b, want]
            for j, i in enumerate(plain):
                n = params[i].top_logprobs
                tops[j] = tuple(zip(ids[j, :n].tolist(), values[j, :n].tolist(), strict=True)) if n else None
        # tokens and their log-probs come back in one transfer (one host sync, not two); float64
        # holds every token id exactly
        picked = torch.stack([tokens.double(), chosen.double()], dim=1).tolist()  # [b, 2]
        for j, (i, (t, lp)) in enumerate(zip(plain, picked, strict=True)):
            out[i] = Pick(int(t), float(lp), tops[j])
    for i, p in enumerate(params):
        if out[i] is None:
            prompt, generated = histories[i] if histories is not None else ([], [])
            try:
                out[i] = sample_row(logits[i].float().cpu(), p, generators[i], prompt, generated)
            except Exception as e:  # a bad processor or parameter: this row fails alone
                out[i] = RowFailed(f"this request failed in the engine during sampling: {type(e).__name__}: {str(e)[:200]}")
    return [o for o in out if o is not None]
