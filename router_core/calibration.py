"""Fitting the centroid router's softmax temperature from its own examples.

Temperature scaling ("On Calibration of Modern Neural Networks", arXiv 1706.04599): pick the
temperature that minimises the negative log-likelihood of the right adapter's routed weight.
The data are the router's centroid rows themselves (the registration examples, kept as rows),
each scored *leave-one-out* so no example votes for itself. A temperature fitted this way
makes the mixture as sharp as the examples justify: a soft mixture (temperature 1 over cosine
scores a few tenths apart) blends in the wrong adapter and was measured worse than the matching
adapter alone, while a calibrated one keeps the right adapter dominant and mixes only where
the examples really overlap.

The switch margin (`fit_switch_margin`) is the second number fitted here. A re-route sees only
the last `route_window` tokens, far less text than the whole prompt the first decision saw, and
at a fitted temperature its weights are nearly one-hot, so one misleading window flips the whole
mixture to the wrong adapter. The margin makes the server keep its current adapter unless the
window's score for another beats it by a fraction of what a typical example's does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from router_core.centroid import CentroidRouter
from router_core.confidence import fit_confidence

# Candidate temperatures, log-spaced: the fit is a 1-D search (no gradient, deterministic).
GRID = tuple(round(10 ** (-2 + 2.5 * i / 40), 5) for i in range(41))  # 0.01 .. ~3.16


def route_nll(router: CentroidRouter, scores: Tensor, labels: Tensor, temperature: float) -> float:
    """Mean −log(weight of the labelled adapter) of `scores` `[N, n]` routed at `temperature`."""
    weights = router.weights_from_scores(scores, temperature)  # [N, n]
    picked = weights.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12)  # [N]
    return float(-picked.log().mean())


def leave_one_out_scores(router: CentroidRouter) -> tuple[Tensor, Tensor] | None:
    """Each centroid row scored against the others (`[M, n]`) and its adapter index `[M]`, or
    None when the router does not vote (too few rows per adapter)."""
    if not router.voting or len(router.adapter_names) < 2:
        return None
    rows, owner = router._tensors(torch.device("cpu"))
    return router.scores(rows, leave_out=torch.arange(rows.shape[0])), owner


def fit_temperature(router: CentroidRouter, scores: Tensor | None = None, labels: Tensor | None = None,
                    grid: tuple[float, ...] = GRID) -> float | None:
    """The grid temperature with the lowest routing NLL on `scores`/`labels` (held-out texts'
    scores and right adapters), by default the router's leave-one-out example scores; None when
    there is nothing to fit on. Ties go to the highest temperature (the softest mixture)."""
    if scores is None or labels is None:
        loo = leave_one_out_scores(router)
        if loo is None:
            return None
        scores, labels = loo
    if scores.shape[0] == 0:
        return None
    best, best_nll = None, math.inf
    for t in sorted(grid, reverse=True):
        nll = route_nll(router, scores, labels, t)
        if nll < best_nll - 1e-9:
            best, best_nll = t, nll
    return best


# A window must beat the current adapter by this fraction of the median example margin to take
# over. Measured on the small routed-perplexity run (docs/routing.md): 1/4 still let misleading
# 32-token literature windows flip to code; 1/2 removed them while real topic changes still
# switch, later (tests/router_core/test_router_calibration.py).
SWITCH_FRACTION = 0.5


def example_margins(router: CentroidRouter) -> Tensor | None:
    """Each example's leave-one-out score for its own adapter minus its best score for another
    (`[M]`, positive = routed right), or None when the router does not vote."""
    loo = leave_one_out_scores(router)
    if loo is None:
        return None
    scores, labels = loo
    own = scores.gather(1, labels[:, None]).squeeze(1)  # [M]
    other = scores.scatter(1, labels[:, None], float("-inf")).max(1).values  # [M]
    return own - other


def fit_switch_margin(router: CentroidRouter, fraction: float = SWITCH_FRACTION) -> float | None:
    """`fraction` of the examples' median leave-one-out margin (`example_margins`): in the
    router's own score units, so it carries over to any embedder. None when there is nothing
    to fit on."""
    margins = example_margins(router)
    if margins is None or margins.numel() == 0:
        return None
    return fraction * max(float(margins.median()), 0.0)


def calibrated(router: CentroidRouter, fallback: float = 1.0) -> CentroidRouter:
    """`router` with its temperature fitted on its own examples (`fallback` when it cannot be)."""
    t = fit_temperature(router)
    return router.with_options(temperature=t if t is not None else fallback)


def with_fitted_switch_margin(router: CentroidRouter) -> CentroidRouter:
    """`router` with its switch margin fitted on its own examples (0, i.e. off, when it cannot be)."""
    m = fit_switch_margin(router)
    return router.with_options(switch_margin=m if m is not None else 0.0)


# -- measuring calibration -------------------------------------------------------------------------------
def reliability(weights: Tensor, labels: Tensor, bins: int = 10) -> list[dict[str, float]]:
    """The reliability diagram of routing decisions ("On Calibration of Modern Neural Networks",
    arXiv 1706.04599): the top adapter's weight is the router's confidence; per equal-width
    confidence bin, how many decisions fell in it, their mean confidence and how many picked
    the labelled adapter. `weights` `[N, n]` route vectors, `labels` `[N]`. Empty bins are left out."""
    if weights.dim() != 2 or labels.shape != (weights.shape[0],):
        raise ValueError(f"weights must be [N, n] and labels [N], got {tuple(weights.shape)}, {tuple(labels.shape)}")
    conf, top = weights.float().max(dim=1)  # [N]
    hit = (top == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    out = []
    for i in range(bins):
        lo, hi = float(edges[i]), float(edges[i + 1])
        inside = (conf > lo) & (conf <= hi) if i else (conf >= lo) & (conf <= hi)
        n = int(inside.sum())
        if n:
            out.append({"low": lo, "high": hi, "count": n, "confidence": float(conf[inside].mean()),
                        "accuracy": float(hit[inside].mean())})
    return out


def expected_calibration_error(weights: Tensor, labels: Tensor, bins: int = 10) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over the reliability
    bins (0 = the weights mean what they say)."""
    table = reliability(weights, labels, bins)
    total = sum(b["count"] for b in table)
    return sum(b["count"] * abs(b["confidence"] - b["accuracy"]) for b in table) / max(total, 1)


# -- calibrated confidence -------------------------------------------------------------------------------
def with_fitted_confidence(router: CentroidRouter) -> CentroidRouter:
    """`router` with a confidence map (`router_core.confidence`) fitted on its own examples
    scored leave-one-out, the same items the temperature is fitted on; unchanged (no map) when
    the router does not vote, so there is nothing held out to fit on."""
    loo = leave_one_out_scores(router)
    if loo is None:
        return router
    fitted = fit_confidence(*loo)
    return router if fitted is None else router.with_options(confidence_map=fitted)
