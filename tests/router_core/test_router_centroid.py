"""Centroid router math against hand-computed cases (arXiv 2311.10847: softmax, top ×4, renormalise)."""

from __future__ import annotations

import math

import pytest
import torch

from router_core import CentroidRouter, boost_and_truncate, fit_centroids

E1, E2, E3 = torch.eye(3)
X = torch.tensor([[0.8, 0.6, 0.0]])  # cosines to e1, e2, e3: 0.8, 0.6, 0.0


def hand_weights(sims: list[float], temperature: float, boost: float) -> list[float]:
    """softmax(sims / T), top adapter × boost, renormalise: written out with `math` only."""
    exps = [math.exp(s / temperature) for s in sims]
    probs = [e / sum(exps) for e in exps]
    top = max(range(len(sims)), key=lambda i: sims[i])
    boosted = [p * boost if i == top else p for i, p in enumerate(probs)]
    return [b / sum(boosted) for b in boosted]


def router(**kw) -> CentroidRouter:
    return CentroidRouter(["a", "b", "c"], [E1[None], E2[None], E3[None]], **kw)


def test_similarities_are_cosines() -> None:
    sims = router().similarities(X * 5.0)  # un-normalised input: still cosine
    assert torch.allclose(sims, torch.tensor([[0.8, 0.6, 0.0]]), atol=1e-6)


def test_default_route_matches_hand_computation() -> None:
    w = router().route(X)  # [1, 3]
    # softmax([.8, .6, 0]) = [.440905, .360983, .198112]; ×4 on "a" and renormalise:
    expected = torch.tensor([[0.759293, 0.155414, 0.085293]])
    assert torch.allclose(w, expected, atol=1e-5)
    assert torch.allclose(w, torch.tensor([hand_weights([0.8, 0.6, 0.0], 1.0, 4.0)]), atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(1))


def test_temperature_and_boost() -> None:
    w = router(temperature=0.5).route(X)
    assert torch.allclose(w, torch.tensor([[0.820982, 0.137580, 0.041438]]), atol=1e-5)
    w = router(temperature=0.2, top_boost=1.0).route(X)  # no boost: plain softmax
    assert torch.allclose(w, torch.tensor([hand_weights([0.8, 0.6, 0.0], 0.2, 1.0)]), atol=1e-6)
    # A per-request override equals a router built with that temperature.
    assert torch.allclose(router().route(X, temperature=0.5), router(temperature=0.5).route(X))


def test_top_k_truncates_and_renormalises() -> None:
    w = router(top_k=2).route(X)
    assert torch.allclose(w, torch.tensor([[0.830094, 0.169906, 0.0]]), atol=1e-5)
    w1 = router().route(X, top_k=1)
    assert torch.equal(w1, torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(router(top_k=5).route(X), router().route(X))  # k >= n is a no-op


def test_min_similarity_gives_all_zero_rows() -> None:
    r = CentroidRouter(["a", "b"], [E1[None], E2[None]], min_similarity=0.3)
    x = torch.stack([E3, torch.tensor([0.8, 0.6, 0.0])])  # row 0 far from both, row 1 close to a
    w = r.route(x)  # [2, 2]
    assert torch.equal(w[0], torch.zeros(2))
    assert torch.allclose(w[1], torch.tensor(hand_weights([0.8, 0.6], 1.0, 4.0)), atol=1e-6)


def test_several_centroids_take_the_max() -> None:
    r = CentroidRouter(["a", "b"], [torch.stack([E1, E3]), E2[None]])
    sims = r.similarities(torch.stack([E3, E1, E2]))
    assert torch.allclose(sims, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    w = r.route(E3[None])
    assert torch.allclose(w, torch.tensor([hand_weights([1.0, 0.0], 1.0, 4.0)]), atol=1e-6)


def test_centroids_are_normalised_and_1d_accepted() -> None:
    r = CentroidRouter(["a", "b"], [3 * E1, 2 * E2[None]])
    assert [tuple(c.shape) for c in r.centroids] == [(1, 3), (1, 3)]
    assert torch.allclose(r.route(X), CentroidRouter(["a", "b"], [E1[None], E2[None]]).route(X))


def test_with_adapters_returns_new_router() -> None:
    r = router(top_k=2, temperature=0.5)
    r2 = r.with_adapters(["x", "y"], [E2[None], E1[None]])
    assert r.adapter_names == ("a", "b", "c") and r2.adapter_names == ("x", "y")
    assert (r2.top_k, r2.temperature) == (2, 0.5)
    r3 = r.with_adapters(["a", "b", "c"], [E1[None], E1[None], E3[None]])  # b's centroid replaced
    assert torch.allclose(r3.similarities(E1[None]), torch.tensor([[1.0, 1.0, 0.0]]))
    empty = r.with_adapters([], [])
    assert empty.route(X).shape == (1, 0)


def test_single_adapter_gets_everything() -> None:
    r = CentroidRouter(["only"], [E1[None]])
    assert torch.allclose(r.route(torch.randn(4, 3)), torch.ones(4, 1))


@pytest.mark.parametrize(
    ("names", "cents", "kw"),
    [
        (["a", "b"], [E1[None]], {}),
        (["a", "a"], [E1[None], E2[None]], {}),
        (["a", "b"], [E1[None], torch.ones(1, 4)], {}),
        (["a"], [torch.zeros(1, 3)], {}),
        (["a"], [torch.full((1, 3), float("nan"))], {}),
        (["a"], [E1[None]], {"temperature": 0.0}),
        (["a"], [E1[None]], {"top_k": 0}),
    ],
)
def test_invalid_construction(names, cents, kw) -> None:
    with pytest.raises(ValueError):
        CentroidRouter(names, cents, **kw)


def test_wrong_embedding_dim() -> None:
    with pytest.raises(ValueError, match="dim"):
        router().route(torch.ones(2, 4))


def test_boost_and_truncate_keeps_rows_on_simplex() -> None:
    probs = torch.softmax(torch.randn(5, 4), -1)  # [5, 4]
    w = boost_and_truncate(probs, probs.argmax(-1), 4.0, 2)
    assert torch.allclose(w.sum(-1), torch.ones(5))
    assert ((w > 0).sum(-1) == 2).all()
    assert torch.equal(w.argmax(-1), probs.argmax(-1))


def test_fit_centroids() -> None:
    torch.manual_seed(0)
    pts = torch.cat([E1 + 0.05 * torch.randn(10, 3), E2 + 0.05 * torch.randn(10, 3)])  # two clusters
    mean = fit_centroids(pts)
    assert mean.shape == (1, 3)
    unit = pts / pts.norm(dim=1, keepdim=True)  # [20, 3]
    expected = unit.mean(0) / unit.mean(0).norm()  # [3]
    assert torch.allclose(mean[0], expected, atol=1e-6)
    two = fit_centroids(pts, k=2)
    assert two.shape == (2, 3) and torch.allclose(two.norm(dim=1), torch.ones(2))
    assert sorted(two.argmax(1).tolist()) == [0, 1]  # one centroid per cluster
    assert torch.equal(two, fit_centroids(pts, k=2))  # deterministic
    assert fit_centroids(pts[:3], k=8).shape == (3, 3)  # fewer examples than k: each is a centroid


def test_voting_scores_read_nothing_back_per_adapter() -> None:
    """Routing runs on the engine's device: the voting scores take each adapter's centroid rows
    by a cached long index, not a boolean mask (a host sync per adapter per re-route on a GPU),
    and give what the mask gives."""
    from tests.syncs import SyncCounter

    torch.manual_seed(0)
    cents = [torch.randn(25, 8) + 3 * torch.eye(8)[i] for i in range(4)]
    router = CentroidRouter(["a", "b", "c", "d"], cents, vote=5)
    assert router.voting
    emb = torch.randn(6, 8)
    router.scores(emb)  # builds the per-device index once
    with SyncCounter() as counter:
        scores = router.scores(emb)
        router.route(emb)
    assert counter.total == 0, dict(counter.sites)
    sims = torch.nn.functional.normalize(emb, dim=-1) @ torch.cat(router.centroids).T
    owner = torch.arange(4).repeat_interleave(25)
    masked = torch.stack([sims[:, owner == i].topk(5, dim=1).values.mean(1) for i in range(4)], 1)
    assert torch.allclose(scores, masked - router.baselines)
