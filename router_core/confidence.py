"""Calibrated confidence: spreading a router's weights when its evidence is thin.

A fitted temperature makes the centroid router's weights sharp wherever the examples separate
cleanly, so every decision comes out near one-hot, including those on text far from every
example, where the two best scores are low and close and the pick is a coin flip. The weights
then claim a certainty the router does not have (a high expected calibration error on such
items, `router_core.calibration.expected_calibration_error`).

The fix here is a *confidence map* from the margin between the router's two best scores to the
probability that its top adapter is the right one,

    confidence(m) = 1/n + (1 - 1/n) · (1 - exp(-rate · m)),   m = score₁ - score₂ >= 0,

which is uniform (1/n) at a tie, rises monotonically with the margin and saturates at 1. `rate`
is fitted by maximum likelihood on items scored the way live text is scored but never seen by
the router (the centroid router's own examples, leave-one-out; an MLP router's validation
split): each item is a Bernoulli trial "the top adapter was right" with that probability. The
route vector is then blended toward uniform weights just enough that its top weight *equals*
the confidence (`spread`), never sharpened, so the trace's top weight is a calibrated
probability and a near-tie gets a near-even mixture instead of a confident wrong pick
("On Calibration of Modern Neural Networks", arXiv 1706.04599, for the reliability/ECE view;
the margin as the signal is the usual top-2 margin of selective classification).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Candidate rates, log-spaced over four decades: the fit is a 1-D search (no gradient, deterministic).
RATE_GRID = tuple(round(10 ** (-0.5 + 4.0 * i / 80), 5) for i in range(81))  # ~0.32 .. ~3162


def top2_margin(scores: Tensor) -> Tensor:
    """`[B]`: each row's best score minus its second best (0 with a single adapter's column,
    which can never be wrong)."""
    if scores.shape[-1] < 2:
        return torch.full(scores.shape[:-1], math.inf, device=scores.device)
    top = scores.float().topk(2, dim=-1).values  # [B, 2]
    return (top[..., 0] - top[..., 1]).clamp_min(0)


@dataclass(frozen=True)
class ConfidenceMap:
    """`confidence(m) = 1/n + (1 - 1/n)(1 - exp(-rate·m))` over the top-2 score margin `m`."""

    rate: float

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive finite number, got {self.rate}")

    def confidence(self, scores: Tensor) -> Tensor:
        """`[B]` the probability that the top-scoring adapter of each row of `scores` `[B, n]` is
        the right one."""
        n = scores.shape[-1]
        if n == 0:
            return scores.new_zeros(scores.shape[:-1])
        chance = 1.0 / n
        rise = -torch.expm1(-self.rate * top2_margin(scores))  # [B] 1 - exp(-rate·m), exact near 0
        return chance + (1 - chance) * rise

    def spread(self, weights: Tensor, scores: Tensor) -> Tensor:
        """`weights` `[B, n]` blended toward uniform so each row's top weight is at most its
        confidence: w' = λ·w + (1 - λ)/n with λ = (c - 1/n) / (w_top - 1/n), clipped to [0, 1].
        All-zero rows (the base model) stay zero; rows already below their confidence stay as
        they are. The top adapter stays the top adapter."""
        n = weights.shape[-1]
        if n < 2:
            return weights
        conf = self.confidence(scores).to(weights.device, weights.dtype)  # [B]
        top = weights.max(dim=-1).values  # [B]
        chance = 1.0 / n
        lam = ((conf - chance) / (top - chance).clamp_min(1e-12)).clamp(0.0, 1.0)  # [B]
        lam = torch.where(weights.sum(-1) > 0, lam, torch.ones_like(lam))  # base-model rows untouched
        return lam[:, None] * weights + (1 - lam[:, None]) * chance * (weights.sum(-1, keepdim=True) > 0)


def confidence_nll(rate: float, margins: Tensor, correct: Tensor, n: int) -> float:
    """Mean Bernoulli negative log-likelihood of `correct` `[N]` (bool) under the map at `rate`."""
    conf = ConfidenceMap(rate).confidence(_as_scores(margins, n))  # [N]
    p = torch.where(correct, conf, 1 - conf).clamp_min(1e-12)
    return float(-p.log().mean())


def _as_scores(margins: Tensor, n: int) -> Tensor:
    """Score rows `[N, n]` whose top-2 margin is `margins` (for evaluating the map on margins)."""
    out = torch.zeros(margins.shape[0], n)
    out[:, 0] = margins.float()
    return out


def fit_confidence(scores: Tensor, labels: Tensor, grid: tuple[float, ...] = RATE_GRID) -> ConfidenceMap | None:
    """The grid rate whose map best predicts, on `scores` `[N, n]` of items the router never saw
    with their right adapters `labels` `[N]`, whether each item's top adapter was right (maximum
    likelihood). None with fewer than two adapters or no items. Ties go to the lowest rate (the
    least confident map); with no wrong item in the data the likelihood keeps rising with the
    rate, so the fit stops at the grid's top."""
    if scores.dim() != 2 or scores.shape[1] < 2 or scores.shape[0] == 0:
        return None
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"labels must be [{scores.shape[0]}], got {tuple(labels.shape)}")
    margins = top2_margin(scores)  # [N]
    correct = scores.argmax(-1) == labels.to(scores.device)  # [N]
    n = int(scores.shape[1])
    best, best_nll = None, math.inf
    for rate in sorted(grid):
        nll = confidence_nll(rate, margins, correct, n)
        if nll < best_nll - 1e-9:
            best, best_nll = rate, nll
    return ConfidenceMap(best) if best is not None else None
