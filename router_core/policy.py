"""The re-route policy, the same for every router kind: when to re-route during generation, how to
avoid flapping, which adapters a decision may use, and how decisions are reported.

arXiv 2311.10847 found re-routing every 2 generated tokens best; 0 means "route once on the prompt".
A hysteresis margin stops the top adapter from alternating between two near-equal choices,
which would otherwise produce noisy traces and metrics for no gain in output quality, and a
switch margin on the router's scores stops a short, misleading re-route window from taking the
mixture away from the adapter the whole prompt chose (that one costs perplexity).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from router_core.router import Router


def last_reroute(n_generated: int, every: int) -> int:
    """The generated-token index at which the gates in force for token `n_generated` were
    decided: 0 (the prompt) when `every == 0`, else the last multiple of `every` at or before it.

    This is the one statement of the re-route cadence: decisions at 0, N, 2N, ... make trace
    segments `[0, N)`, `[N, 2N)`, ... The engine (`reroute_due`), the routed-perplexity
    evaluation and `ReroutePolicy.due` all derive from it.
    """
    if n_generated < 0:
        raise ValueError(f"n_generated must be >= 0, got {n_generated}")
    return 0 if every <= 0 else (n_generated // every) * every


def reroute_due(n_generated: int, every: int) -> bool:
    """Whether to route before generating the token at index `n_generated`: always at 0 (the
    prompt); afterwards every `every` tokens, never when `every == 0`."""
    return last_reroute(n_generated, every) == n_generated


@dataclass(frozen=True)
class Decision:
    """One routing decision for one row: the route vector (after the anti-flapping rules), the
    router's adapter order it is over, and the gates it gives the adapters the row holds."""

    vector: Tensor  # [n]
    names: tuple[str, ...]
    gates: dict[str, float]


def renormalise(gates: Mapping[str, float], held: Collection[str]) -> dict[str, float]:
    """`gates` restricted to the adapters a row holds, rescaled to sum to 1 (empty = base model).
    A row holds the adapters it acquired when it started; a router rebuilt since may name more."""
    kept = {n: w for n, w in gates.items() if n in held and w > 0}
    total = sum(kept.values())
    return {n: w / total for n, w in kept.items()} if total > 0 else {}


class ReroutePolicy:
    """The re-route cadence and the rules that turn a router's proposal into a row's gates.

    `every` is the server's default cadence (`--reroute-every`); a request may ask for its own
    (`cadence`). `hysteresis` is a margin on the proposed weights, and a router's own
    `switch_margin` a margin on its scores (`stabilise`). `decide` is the whole path from an
    embedding to gates; the gater and the routed-perplexity evaluation both call it.
    """

    def __init__(self, every: int = 2, hysteresis: float = 0.05) -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        if hysteresis < 0:
            raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
        self.every = int(every)
        self.hysteresis = float(hysteresis)

    def cadence(self, requested: int | None = None) -> int:
        """The re-route cadence of a request: its own `reroute_every` when it set one, else the
        policy's default."""
        if requested is not None and requested < 0:
            raise ValueError(f"reroute_every must be >= 0, got {requested}")
        return self.every if requested is None else int(requested)

    def due(self, n_generated: int, every: int | None = None) -> bool:
        """Whether to route before generating the token at index `n_generated`
        (`reroute_due` at `cadence(every)`)."""
        return reroute_due(n_generated, self.cadence(every))

    def decide(self, router: Router, embedding: Tensor, held: Collection[str], *,
               complexity: Tensor | None = None, previous: Tensor | None = None,
               previous_names: tuple[str, ...] | None = None, temperature: float | None = None,
               top_k: int | None = None) -> Decision:
        """Route one row: `embedding` `[1, d]` (and its `complexity` `[1, c]` when the router
        needs it) through `router`, keep the `previous` route vector when the switch is too
        narrow (`stabilise`, with the router's switch margin on its scores), then the gates over
        the adapters in `held`, renormalised. A previous vector over another adapter list (the
        router was rebuilt) does not hold the new one back. (`decide_rows` for one row.)"""
        return self.decide_rows(router, embedding, [held], complexity=complexity, previous=[previous],
                                previous_names=[previous_names], temperature=temperature, top_k=top_k)[0]

    def decide_rows(self, router: Router, embeddings: Tensor, held: Sequence[Collection[str]], *,
                    complexity: Tensor | None = None, previous: Sequence[Tensor | None] | None = None,
                    previous_names: Sequence[tuple[str, ...] | None] | None = None,
                    temperature: float | None = None, top_k: int | None = None) -> list[Decision]:
        """`decide` for the `[B, d]` rows that share `router` and the request options: one call
        to the router and one host read for all of them (`propose`, `to_host`, `decisions`)."""
        vectors = self.propose(router, embeddings, complexity=complexity, previous=previous,
                               previous_names=previous_names, temperature=temperature, top_k=top_k)
        return self.decisions(router, vectors, held, to_host([vectors])[0])

    def propose(self, router: Router, embeddings: Tensor, *, complexity: Tensor | None = None,
                previous: Sequence[Tensor | None] | None = None,
                previous_names: Sequence[tuple[str, ...] | None] | None = None,
                temperature: float | None = None, top_k: int | None = None, form: Tensor | None = None) -> Tensor:
        """The route vectors `[B, n]` of rows that share `router` and the request options, after
        the anti-flapping rule per row (`stabilise`: a row keeps its `previous[i]` vector when
        the switch is too narrow; a row without one, or with one over another adapter list,
        takes the proposal). One `route` call (and one `scores` call when the router has a
        switch margin) for the whole batch, and no host read: on a GPU each read is a sync, and
        a re-route step used to read once per row."""
        vectors = router.route(embeddings, complexity, temperature=temperature, top_k=top_k, form=form)  # [B, n]
        names = tuple(router.adapter_names)
        b, n = vectors.shape
        prev = list(previous) if previous is not None else [None] * b
        prev_names = list(previous_names) if previous_names is not None else [None] * b
        if len(prev) != b or len(prev_names) != b:
            raise ValueError(f"{len(prev)} previous vectors and {len(prev_names)} name lists for {b} rows")
        usable = [p is not None and pn == names and tuple(p.shape) == (n,) for p, pn in zip(prev, prev_names, strict=True)]
        if not any(usable):
            return vectors
        margin = router.switch_margin
        scores = router.scores(embeddings, complexity) if margin > 0 else None  # [B, n]
        zero = vectors.new_zeros(n)  # an all-zero previous row never holds a proposal back
        held_back = torch.stack([p.to(vectors.device, vectors.dtype) if ok and p is not None else zero
                                 for p, ok in zip(prev, usable, strict=True)])  # [B, n]
        return self.stabilise(held_back, vectors, scores, margin)

    def decisions(self, router: Router, vectors: Tensor, held: Sequence[Collection[str]],
                  host: Sequence[Sequence[float]]) -> list[Decision]:
        """One `Decision` per row of `vectors` `[B, n]` (from `propose`), its gates over the
        adapters in `held[i]` from `host[i]`, the same row already read back (`to_host`)."""
        names = tuple(router.adapter_names)
        if len(held) != vectors.shape[0] or len(host) != vectors.shape[0]:
            raise ValueError(f"{len(held)} held sets and {len(host)} host rows for {vectors.shape[0]} vectors")
        return [Decision(vectors[i], names, renormalise(_positive(names, row), h))
                for i, (h, row) in enumerate(zip(held, host, strict=True))]

    def stabilise(self, previous: Tensor | None, proposed: Tensor, scores: Tensor | None = None,
                  switch_margin: float = 0.0) -> Tensor:
        """Keep `previous` when the proposal only switches the top adapter by a hair.

        Switch when the proposed top beats the proposed weight of the previous top by at least
        `hysteresis` and, given the router's `scores` behind the proposal (same shape), its score
        beats the previous top's score by at least `switch_margin`; otherwise return `previous`
        unchanged. The score test is the one that matters for the centroid router: its weights
        are boosted (x4 on the top) and at a fitted temperature nearly one-hot, so a weight
        margin is large for any switch, however slim the evidence. Works on `[n]` or per row on
        `[B, n]`. All-zero rows (the base model, no adapter) never count as a top adapter, and a
        changed adapter count means the proposal wins.
        """
        if previous is None or previous.shape != proposed.shape or proposed.shape[-1] == 0:
            return proposed
        n = proposed.shape[-1]
        prev = previous.to(proposed.device, proposed.dtype)
        p2, q2 = prev.reshape(-1, n), proposed.reshape(-1, n)  # [B, n]
        prev_top = p2.argmax(-1)  # [B]
        new_top = q2.argmax(-1)  # [B]
        margin = q2.gather(1, new_top[:, None]) - q2.gather(1, prev_top[:, None])  # [B, 1]
        narrow = margin.squeeze(1) < self.hysteresis  # [B]
        if scores is not None and switch_margin > 0:
            s2 = scores.to(proposed.device).float().reshape(-1, n)  # [B, n]
            lead = s2.gather(1, new_top[:, None]) - s2.gather(1, prev_top[:, None])  # [B, 1]
            narrow = narrow | (lead.squeeze(1) < switch_margin)
        real = (p2.abs().sum(-1) > 0) & (q2.abs().sum(-1) > 0)  # [B] both rows pick an adapter
        keep = real & (new_top != prev_top) & narrow  # [B]
        return torch.where(keep[:, None], p2, q2).reshape(proposed.shape)


def weights_dict(adapter_names: Sequence[str], weights: Tensor, min_weight: float = 0.0) -> dict[str, float]:
    """Gates `{adapter: weight}` from one route vector `[n]`, dropping weights <= `min_weight`
    (zeros by default)."""
    if weights.dim() != 1 or weights.shape[0] != len(adapter_names):
        raise ValueError(f"weights must be [{len(adapter_names)}], got {tuple(weights.shape)}")
    return _positive(adapter_names, weights.tolist(), min_weight)


def _positive(adapter_names: Sequence[str], weights: Sequence[float], min_weight: float = 0.0) -> dict[str, float]:
    """`weights_dict` from a row already on the host."""
    if len(weights) != len(adapter_names):
        raise ValueError(f"weights must be [{len(adapter_names)}], got {len(weights)}")
    return {n: float(w) for n, w in zip(adapter_names, weights, strict=True) if w > min_weight}


def to_host(matrices: Sequence[Tensor]) -> list[list[list[float]]]:
    """`[B_j, n_j]` matrices (route vectors of several routers) as nested lists, read back in one
    transfer: flattened and concatenated on their device first, so a re-route step costs one
    host sync however many rows and routers it has. Values go through float64, which holds any
    float32/bf16/fp16 value exactly."""
    if not matrices:
        return []
    device = next((m.device for m in matrices if m.device.type != "cpu"), matrices[0].device)
    flat = torch.cat([m.detach().reshape(-1).to(device, torch.float64) for m in matrices]).tolist()  # the one read
    out: list[list[list[float]]] = []
    at = 0
    for m in matrices:
        b, n = m.shape
        out.append([flat[at + r * n: at + (r + 1) * n] for r in range(b)])
        at += b * n
    return out


@dataclass(frozen=True)
class _Step:
    token_index: int
    weights: dict[str, float]


def confidence(weights: Mapping[str, float]) -> float | None:
    """A decision's confidence: its top adapter's share of the gates (rounded to 4 places), None
    for the base model (no adapter). The centroid router's weights are calibrated to make this
    the probability that the top adapter is the right one (`router_core.confidence`); for the
    MLP router it is its softmax's top probability, for Arrow the top mean weight over layers
    and tokens, and a fixed adapter is 1."""
    total = sum(w for w in weights.values() if w > 0)
    return round(max(weights.values()) / total, 4) if total > 0 else None


def _top(weights: Mapping[str, float]) -> str | None:
    best = max(weights.items(), key=lambda kv: kv[1], default=None)
    return best[0] if best is not None and best[1] > 0 else None


def _max_diff(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    return max((abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b)), default=0.0)


class RoutingTrace:
    """The gates of one generated sequence per step, summarised as token-range segments.

    The server records the gates in force for each generated token (or at each decision);
    `segments()` merges consecutive steps with the same top adapter whose weights stay within
    `tolerance` of the segment's first step, so a response lists decisions, not tokens. A
    segment reports the weights of its first step (those in force at `start_token`).
    """

    def __init__(self, tolerance: float = 0.02) -> None:
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.tolerance = float(tolerance)
        self._steps: list[_Step] = []

    def __len__(self) -> int:
        return len(self._steps)

    def record(self, token_index: int, weights: Mapping[str, float]) -> None:
        """Record the weights in force from generated token `token_index` on."""
        if self._steps and token_index < self._steps[-1].token_index:
            raise ValueError(f"token_index {token_index} < last recorded {self._steps[-1].token_index}")
        step = _Step(int(token_index), {k: float(v) for k, v in weights.items()})
        if self._steps and self._steps[-1].token_index == step.token_index:
            self._steps[-1] = step  # re-decided for the same token: the later decision wins
        else:
            self._steps.append(step)

    @property
    def last_weights(self) -> dict[str, float] | None:
        """The weights currently in force, or None before the first record."""
        return dict(self._steps[-1].weights) if self._steps else None

    def segments(self, end_token: int | None = None) -> list[dict]:
        """`[{"start_token", "end_token", "weights", "confidence"}]`, end exclusive, weights
        rounded to 4 places, `confidence` as `confidence()` says.

        The last segment ends at `end_token` when given (the number of tokens generated; pass it
        when recording only at decisions), else one past the last recorded step.
        """
        if not self._steps:
            return []
        groups: list[tuple[_Step, int]] = []  # (first step of the segment, its end)
        for step in self._steps:
            if groups:
                first, _ = groups[-1]
                if _top(first.weights) == _top(step.weights) and _max_diff(first.weights, step.weights) <= (
                    self.tolerance
                ):
                    groups[-1] = (first, step.token_index + 1)
                    continue
                groups[-1] = (first, step.token_index)
            groups.append((step, step.token_index + 1))
        if end_token is not None:
            first, end = groups[-1]
            groups[-1] = (first, max(end, int(end_token)))
        return [
            {
                "start_token": first.token_index,
                "end_token": end,
                "weights": {k: round(v, 4) for k, v in first.weights.items()},
                "confidence": confidence(first.weights),
            }
            for first, end in groups
        ]
