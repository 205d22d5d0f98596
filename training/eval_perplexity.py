"""Per-domain perplexity of base, each adapter, and routed mixtures re-routed every N tokens.

The routed mixture is what the server computes during generation: the prompt is routed
once (prefill) on its last ``route_prompt_tokens`` tokens, then before generated token ``n``
with ``n % N == 0`` the router sees the last ``route_window`` tokens of the context so far
(:func:`context_length`, :func:`routing_spans`), with the server's hysteresis and switch margin
against flapping. Here the whole text is scored in one
teacher-forced forward with per-position gates; as attention is causal and a position's
gates only change its own computation, that equals KV-cached decoding where earlier
positions keep the gates they were computed with. For the ``base`` embedder the context
embeddings come from one forward of the base model (the mean of the span's hidden states,
``router_core.embedders.pool_hidden``), as the server reuses its hidden states; other
embedders embed the span's decoded text.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from router_core.policy import last_reroute
from training.lm import LMDataset, mean_token_nll, perplexity

log = logging.getLogger(__name__)


def context_length(pos: int, prompt_len: int, every: int, total: int) -> int:
    """How many tokens the router had seen when the gates for position ``pos`` were set.

    Prefill (positions ``< prompt_len - 1``, and the last prompt position, which predicts
    generated token 0) uses the prompt's routing. The forward at position ``pos`` produces
    generated token ``n = pos - prompt_len + 1``; the server last routed before token
    ``n' = last_reroute(n, every)`` (the server's cadence, ``router_core.policy``), on the
    prompt plus ``n'`` generated tokens. ``every == 0`` routes once on the prompt.
    """
    if pos < prompt_len - 1:
        return prompt_len
    return min(prompt_len + last_reroute(pos - prompt_len + 1, every), total)


def routing_spans(prompt_len: int, lengths: list[int], prompt_window: int, route_window: int) -> list[tuple[int, int]]:
    """The token span ``[start, end)`` each decision embeds, as the server's gater does: the
    first decision (on the prompt, ``end == prompt_len``) its last ``prompt_window`` tokens,
    every re-route the last ``route_window`` tokens of the context so far."""
    return [(max(0, n - (prompt_window if n == prompt_len else route_window)), n) for n in lengths]


def position_gates(ev: Any, rut: Any, domain: str) -> tuple[list[Tensor], float]:
    """Per-example ``[T, K_r]`` gates re-routed every N tokens, and mean top-1 switches."""
    from router_core.embedders import BaseEmbedder, pool_hidden
    from training.embedding import embed

    cfg = ev.cfg
    margin = rut.router.switch_margin  # 0 for routers without a score test
    gates, switches = [], 0
    for item, ex in zip(ev.datasets[domain].items, ev.datasets[domain].examples, strict=True):
        ids = item["input_ids"]
        t = len(ids)
        p = item["prompt_len"] if ex.completion else min(cfg.context_tokens, t)
        p = max(1, min(p, t))
        ctx = [context_length(pos, p, cfg.reroute_every, t) for pos in range(t)]
        lengths = sorted(set(ctx))
        if isinstance(rut.embedder, BaseEmbedder) and not rut.needs_complexity:
            spans = routing_spans(p, lengths, cfg.route_prompt_tokens, rut.embedder.window or cfg.route_window)
            with torch.no_grad():
                body = ev.model.transformer
                x = torch.tensor([ids], device=ev.device)  # [1, T]
                hidden = body(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state  # [1, T, d]
            emb = torch.cat([pool_hidden(hidden[:, :end], window=end - start) for start, end in spans]).cpu()
            w = rut.router.route(emb)
        else:
            spans = routing_spans(p, lengths, cfg.route_prompt_tokens, cfg.route_window)
            texts = [ev.tokenizer.decode(ids[start:end]) for start, end in spans]
            emb = embed(rut.embedder, texts)
            w = ev.route(rut, texts, emb)
        scores = rut.router.scores(emb) if margin > 0 else None
        w = stabilise(w, cfg.hysteresis, scores, margin)
        row = {n: i for i, n in enumerate(lengths)}
        g = w[[row[c] for c in ctx]]  # [T, K_r]
        top = w.argmax(-1)
        switches += int((top[1:] != top[:-1]).sum())
        gates.append(g)
    return gates, switches / max(len(gates), 1)


def stabilise(weights: Tensor, hysteresis: float, scores: Tensor | None = None, switch_margin: float = 0.0) -> Tensor:
    """Apply the server's anti-flapping rule (``ReroutePolicy.stabilise``) along the re-routes
    (``scores``: the centroid router's scores behind each row, for its switch margin)."""
    from router_core.policy import ReroutePolicy

    policy = ReroutePolicy(every=1, hysteresis=hysteresis)
    rows = [weights[0]]
    for k in range(1, weights.shape[0]):
        rows.append(policy.stabilise(rows[-1], weights[k], None if scores is None else scores[k], switch_margin))
    return torch.stack(rows)


def perplexities(ev: Any, routers: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Base, per-adapter and routed perplexity of every domain (one model, same tokens),
    plus the mean number of top-1 switches per example for each router."""
    from training.mixture import LoraMixture

    gates = {r.key: {d: position_gates(ev, r, d) for d in ev.domains} for r in routers}
    mixture = LoraMixture(ev.model, dict(ev.folders))
    mixture.model.eval()
    ev.mixture = mixture  # the Arrow evaluation reuses it (the base model now carries its layers)
    names = mixture.names
    result: dict[str, Any] = {}
    switch_stats: dict[str, Any] = {r.key: {} for r in routers}
    for d in ev.domains:
        ds = ev.datasets[d]

        def fixed(name: str | None):
            return lambda idx: mixture.set_gates(mixture.one_hot(name, len(idx)))

        entry: dict[str, Any] = {"base": _ppl(ev, mixture, ds, fixed(None)), "adapters": {}, "routed": {}}
        for a in names:
            entry["adapters"][a] = _ppl(ev, mixture, ds, fixed(a))
        for r in routers:
            per_ex, mean_switches = gates[r.key][d]
            cols = [names.index(a) for a in r.adapters]
            width = max(len(it["input_ids"]) for it in ds.items)

            def routed(idx, per_ex=per_ex, cols=cols, width=width):
                g = torch.zeros(len(idx), width, len(names))  # [B, T, K] per-position gates
                for j, i in enumerate(idx):
                    g[j, : per_ex[i].shape[0], cols] = per_ex[i]
                mixture.set_gates(g)

            entry["routed"][r.key] = _ppl(ev, mixture, ds, routed)
            switch_stats[r.key][d] = mean_switches
        result[d] = entry
        log.info(
            "perplexity %s: base %.2f, adapters %s, routed %s",
            d,
            entry["base"],
            entry["adapters"],
            entry["routed"],
        )
    mixture.set_gates(None)
    return result, switch_stats


def _ppl(ev: Any, mixture: Any, ds: LMDataset, set_gates: Any) -> float:
    pad = ev.tokenizer.pad_token_id
    return perplexity(mean_token_nll(mixture.model, ds, pad, ev.cfg.batch_size, set_gates))
