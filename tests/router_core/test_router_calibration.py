"""Nearest-example voting, its leave-one-out baseline, and the fitted temperature."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from router_core import CentroidRouter
from router_core.calibration import GRID, fit_temperature, leave_one_out_scores, route_nll


def _clusters(seed: int, n: int, spread: float, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(2, d, generator=g), dim=-1)
    rows = [F.normalize(centres[i] + spread * torch.randn(n, d, generator=g), dim=-1) for i in range(2)]
    return rows[0], rows[1]


def test_voting_needs_four_rows_per_vote_everywhere() -> None:
    a, b = _clusters(0, 8, 0.3)
    assert CentroidRouter(["a", "b"], [a, b], vote=2).voting
    assert not CentroidRouter(["a", "b"], [a, b[:7]], vote=2).voting  # b has fewer than 4 * vote rows
    assert not CentroidRouter(["a", "b"], [a, b]).voting  # default vote 5: 20 rows each
    mixed = CentroidRouter(["a", "b"], [a, b[:1]])
    x = torch.randn(4, 16)
    assert torch.equal(mixed.scores(x), mixed.similarities(x))  # max over centroids, as before


def test_vote_scores_by_hand() -> None:
    a, b = _clusters(1, 12, 0.5)
    r = CentroidRouter(["a", "b"], [a, b], vote=3)  # baseline weight 0.5 by default
    x = F.normalize(torch.randn(3, 16), dim=-1)
    expected = []
    for rows in (a, b):
        sims = rows @ rows.T
        own = [torch.cat([sims[i, :i], sims[i, i + 1:]]).topk(3).values.mean() for i in range(12)]
        expected.append((x @ rows.T).topk(3, dim=1).values.mean(1) - 0.5 * torch.stack(own).mean())
    assert torch.allclose(r.scores(x), torch.stack(expected, 1), atol=1e-6)


def test_leave_one_out_scores_exclude_the_row_itself() -> None:
    a, b = _clusters(2, 8, 0.4)
    r = CentroidRouter(["a", "b"], [a, b], vote=2)
    scores, labels = leave_one_out_scores(r)
    assert labels.tolist() == [0] * 8 + [1] * 8
    for j in range(16):
        own, other = (a, b) if j < 8 else (b, a)
        row = torch.cat([a, b])[j]
        rest = torch.cat([own[: j % 8], own[j % 8 + 1:]])
        col = labels[j]
        assert torch.allclose(scores[j, col], (rest @ row).topk(2).values.mean() - r.baselines[col], atol=1e-6)
        assert torch.allclose(scores[j, 1 - col], (other @ row).topk(2).values.mean() - r.baselines[1 - col], atol=1e-6)


def test_fitted_temperature_minimises_the_routing_nll() -> None:
    a, b = _clusters(3, 30, 0.4)  # overlapping clusters: the best temperature is not at the grid's edge
    r = CentroidRouter(["a", "b"], [a, b])
    scores, labels = leave_one_out_scores(r)
    t = fit_temperature(r)
    assert t is not None and GRID[0] < t < GRID[-1]
    nlls = {g: route_nll(r, scores, labels, g) for g in GRID}
    assert nlls[t] == min(nlls.values())
    separable = CentroidRouter(["a", "b"], list(_clusters(4, 20, 0.05)))
    sharp = fit_temperature(separable)  # no overlap: sharp (the softest that is already certain)
    assert sharp is not None and sharp < 0.1
    assert route_nll(separable, *leave_one_out_scores(separable), sharp) < 1e-6
    assert fit_temperature(CentroidRouter(["a", "b"], [a[:1], b[:1]])) is None  # nothing to leave out
