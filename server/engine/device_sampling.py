"""Next-token choice for a whole batch on the logits' device: the sampler the engine uses on CUDA.

`sampling.sample_batch` samples each non-greedy row on the CPU (`.float().cpu()`, then softmax,
sort and `multinomial` with the row's CPU generator): B device-to-host copies and milliseconds of
host work per step on a GPU. Here every row is decided in a handful of batched kernels on the
device and the results come back in one copy (one host sync per step):

- logit bias added with one `index_put_`; log-probabilities (what a `Pick` reports: after the
  bias, before the temperature) from one `log_softmax`;
- temperature, top-k (per-row k: the k-th largest of one `topk` at the batch's largest k) and
  top-p (one sort, the token that crosses `top_p` kept) as in `sampling.sample_row`;
- the draw is an exponential race, `argmax(p / E)` with `E ~ Exp(1)` drawn from the row's own
  device generator (vLLM's sampler does the same): token i wins with probability `p_i`, and a
  row's draw depends on its own generator alone, so a seeded request gets the same tokens alone
  or in any batch. Greedy rows take the argmax of their biased logits.

Rows with penalties (repetition, presence, frequency, min_tokens) keep the CPU path: they need
the row's history. A seed reproduces its tokens on the same kind of device; the CPU path's
`multinomial` and this race consume randomness differently, so a seed's tokens differ between
a CPU and a CUDA server (OpenAI documents `seed` as best-effort determinism too).
"""

from __future__ import annotations

import torch

from server.engine.batch import to_device
from server.engine.sampling import Pick, SamplingParams, Top


def eligible(params: SamplingParams) -> bool:
    """Whether this sampler takes the row (penalised rows, `bad_words` included, need their
    history, and `min_p` is applied on the CPU path only)."""
    return not params.penalised and not params.min_p


def device_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded like the request's CPU one (`Generator.initial_seed()`)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> list[Pick]:
    """One token per row of `logits` [B, V] (rows `eligible`), each non-greedy row drawing from its
    own generator on the logits' device; one host sync for the whole batch."""
    B, V = logits.shape
    dev = logits.device
    x = logits.float()
    biased = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
    if biased:
        rows, cols, vals = zip(*biased, strict=True)
        x = x.index_put((to_device(torch.tensor(rows), dev), to_device(torch.tensor(cols), dev)),
                        to_device(torch.tensor(vals, dtype=x.dtype), dev), accumulate=True)
    logprobs = x.log_softmax(dim=-1)  # [B, V]
    greedy = [p.greedy for p in params]
    host = torch.tensor([[1.0 if p.greedy else p.temperature, float(p.top_k), p.top_p] for p in params])
    knobs = to_device(host, dev)  # [B, 3]: temperature, top_k, top_p
    scaled = x / knobs[:, :1]
    k_max = max(p.top_k for p in params)
    if k_max > 0:
        top_vals = torch.topk(scaled, min(k_max, V), dim=-1).values  # [B, k_max]
        k = knobs[:, 1].long().clamp(1, min(k_max, V))  # rows without top-k read column 0 and keep all below
        kth = top_vals.gather(1, (k - 1)[:, None])  # [B, 1]
        kth = torch.where(knobs[:, 1:2] > 0, kth, torch.full_like(kth, float("-inf")))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        sorted_logits, order = torch.sort(scaled, descending=True, dim=-1)
        p_sorted = torch.softmax(sorted_logits, dim=-1)
        drop = p_sorted.cumsum(dim=-1) - p_sorted >= knobs[:, 2:3]  # keep the token that crosses top_p
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    noise = torch.ones_like(probs)
    for i, gen in enumerate(generators):
        if not greedy[i]:
            noise[i].exponential_(generator=gen)  # per row, its own stream: no other row moves it
    drawn = (probs / noise).argmax(dim=-1)  # [B]
    argmax = x.argmax(dim=-1)  # [B]
    is_greedy = to_device(torch.tensor(greedy), dev)
    tokens = torch.where(is_greedy, argmax, drawn)  # [B]
    chosen = logprobs.gather(1, tokens[:, None])  # [B, 1]
    parts = [tokens.double()[:, None], chosen.double()]
    want = max(p.top_logprobs for p in params)
    if want:
        values, ids = torch.topk(logprobs, min(want, V), dim=-1)  # [B, want]
        parts += [ids.double(), values.double()]
    packed = torch.cat(parts, dim=1).tolist()  # the one host sync: [B, 2 (+ 2 want)]
    out = []
    for p, row in zip(params, packed, strict=True):
        top: Top | None = None
        if p.top_logprobs:
            n, w = p.top_logprobs, len(row[2:]) // 2
            top = tuple((int(t), float(v)) for t, v in zip(row[2:2 + n], row[2 + w:2 + w + n], strict=True))
        out.append(Pick(int(row[0]), float(row[1]), top))
    return out
