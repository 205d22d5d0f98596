"""Calibrated confidence (router_core/confidence.py) on synthetic data where the answer is known.

The map is uniform at a tie and rises monotonically with the top-2 margin; fitted by maximum
likelihood it recovers the rate that generated the data; `spread` makes a route vector's top
weight equal its confidence without changing the top adapter; an item far from every example
(a near-tie) gets near-uniform weights from a fitted centroid router, one near its own examples
stays sharp; the MLP router's map survives its artifact.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from router_core.artifacts import load_router, save_router
from router_core.calibration import expected_calibration_error, with_fitted_confidence
from router_core.centroid import CentroidRouter
from router_core.confidence import ConfidenceMap, fit_confidence, top2_margin
from router_core.mlp import MLPRouter, MLPRouterNet
from router_core.policy import RoutingTrace, confidence


def _scores(margins: torch.Tensor, n: int = 3) -> torch.Tensor:
    s = torch.zeros(len(margins), n)
    s[:, 0] = margins
    return s


def test_confidence_is_uniform_at_a_tie_and_monotone_in_the_margin() -> None:
    cmap = ConfidenceMap(rate=10.0)
    margins = torch.linspace(0, 1, 50)
    conf = cmap.confidence(_scores(margins, n=4))
    assert conf[0] == pytest.approx(0.25)  # a tie: chance among 4 adapters
    assert bool((conf[1:] > conf[:-1]).all())  # strictly rising with the margin
    assert conf[-1] == pytest.approx(1 - 0.75 * math.exp(-10), abs=1e-6)
    assert top2_margin(torch.tensor([[0.3, 0.9, 0.5]])).item() == pytest.approx(0.4)


def test_fit_recovers_the_rate_that_generated_the_data() -> None:
    gen = torch.Generator().manual_seed(0)
    true = ConfidenceMap(rate=8.0)
    margins = torch.rand(2000, generator=gen) * 0.6
    scores = _scores(margins, n=2)
    right = torch.rand(2000, generator=gen) < true.confidence(scores)  # top adapter (0) right w.p. conf
    labels = torch.where(right, 0, 1)
    fitted = fit_confidence(scores, labels)
    assert fitted is not None and fitted.rate == pytest.approx(8.0, rel=0.2)
    # fitted this way the top weight is calibrated: ECE of the spread one-hot weights is small
    weights = fitted.spread(F.one_hot(scores.argmax(-1), 2).float(), scores)
    assert expected_calibration_error(weights, labels) < 0.03
    assert expected_calibration_error(F.one_hot(scores.argmax(-1), 2).float(), labels) > 0.08  # ~E[1 - conf]


def test_spread_sets_the_top_weight_to_the_confidence_and_keeps_the_top() -> None:
    cmap = ConfidenceMap(rate=5.0)
    scores = torch.tensor([[0.50, 0.45, 0.0], [0.9, 0.1, 0.0], [0.2, 0.2, 0.2]])
    weights = torch.tensor([[0.98, 0.01, 0.01], [0.999, 0.0005, 0.0005], [0.4, 0.3, 0.3]])
    out = cmap.spread(weights, scores)
    conf = cmap.confidence(scores)
    assert torch.allclose(out.sum(-1), torch.ones(3))
    assert out[0].max() == pytest.approx(float(conf[0]), abs=1e-6)  # sharp on thin evidence: spread
    assert out[1].max() == pytest.approx(float(conf[1]), abs=1e-6)
    assert torch.allclose(out[2], torch.full((3,), 1 / 3), atol=1e-6)  # a tie: uniform
    assert out[:2].argmax(-1).tolist() == [0, 0]
    soft = torch.tensor([[0.5, 0.3, 0.2]])
    assert torch.equal(cmap.spread(soft, torch.tensor([[5.0, 0.0, 0.0]])), soft)  # never sharpened
    assert torch.equal(cmap.spread(torch.zeros(1, 3), scores[:1]), torch.zeros(1, 3))  # base model stays


def _router(seed: int = 0) -> tuple[CentroidRouter, torch.Tensor, torch.Tensor]:
    """Two adapters whose examples cluster around orthogonal directions (noise makes a few of
    the leave-one-out decisions close)."""
    gen = torch.Generator().manual_seed(seed)
    d = 32
    a, b = torch.zeros(d), torch.zeros(d)
    a[0], b[1] = 1.0, 1.0
    ex_a = F.normalize(a + 0.9 * torch.randn(30, d, generator=gen), dim=-1)
    ex_b = F.normalize(b + 0.9 * torch.randn(30, d, generator=gen), dim=-1)
    return CentroidRouter(["a", "b"], [ex_a, ex_b], temperature=0.05), a, b


def test_far_item_gets_near_uniform_weights_and_a_typical_one_stays_sharp() -> None:
    router, a, b = _router()
    fitted = with_fitted_confidence(router)
    assert fitted.confidence_map is not None and router.confidence_map is None
    far = torch.zeros(1, 32)
    far[0, 5] = 1.0  # orthogonal to both adapters' directions: a coin flip
    half = F.normalize(a + b, dim=-1)[None]  # exactly between them
    before, after = router.route(torch.cat([far, half])), fitted.route(torch.cat([far, half]))
    assert after.max(-1).values.max() < 0.6 < before.max(-1).values.min()  # spread, not a confident pick
    typical = fitted.route(a[None])
    assert typical.argmax(-1).item() == 0 and typical.max().item() > 0.9
    # the map is kept across the router's rebuilds and dropped on request
    assert fitted.with_adapters(["a", "b"], fitted.centroids).confidence_map == fitted.confidence_map
    assert fitted.with_options(calibrate=False).confidence_map is None


def test_top_k_still_bounds_a_spread_mixture() -> None:
    router = with_fitted_confidence(_router()[0])
    far = torch.zeros(1, 32)
    far[0, 7] = 1.0
    assert (router.route(far, top_k=1) > 0).sum().item() == 1


def test_trace_reports_each_decisions_confidence() -> None:
    trace = RoutingTrace()
    trace.record(0, {"a": 0.55, "b": 0.45})
    trace.record(4, {"a": 0.1, "b": 0.9})
    assert [s["confidence"] for s in trace.segments()] == [0.55, 0.9]
    assert confidence({}) is None and confidence({"a": 2.0}) == 1.0


def test_mlp_router_confidence_map_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    net = MLPRouterNet(8, 2, 0, hidden=4)
    router = MLPRouter(net, ["a", "b"], "minilm:test", confidence_map=ConfidenceMap(rate=3.0))
    save_router(tmp_path / "r", router)
    loaded = load_router(tmp_path / "r")
    assert loaded.confidence_map == ConfidenceMap(rate=3.0)
    x = torch.randn(5, 8)
    assert torch.allclose(loaded.route(x), router.route(x))
    logits = router.scores(x)
    assert torch.allclose(router.route(x).max(-1).values,
                          torch.minimum(torch.softmax(logits, -1).max(-1).values, router.confidence_map.confidence(logits)))
