"""Re-routing cadence, hysteresis against flapping, and routing-trace segments."""

from __future__ import annotations

import pytest
import torch

from router_core import ReroutePolicy, RoutingTrace, weights_dict


@pytest.mark.parametrize(
    ("every", "expected"),
    [
        (2, [True, False, True, False, True, False, True]),
        (1, [True] * 7),
        (3, [True, False, False, True, False, False, True]),
        (0, [True, False, False, False, False, False, False]),  # once, on the prompt
    ],
)
def test_due_cadence(every: int, expected: list[bool]) -> None:
    policy = ReroutePolicy(every=every)
    assert [policy.due(n) for n in range(7)] == expected


def test_invalid_policy() -> None:
    with pytest.raises(ValueError):
        ReroutePolicy(every=-1)
    with pytest.raises(ValueError):
        ReroutePolicy(hysteresis=-0.1)
    with pytest.raises(ValueError):
        ReroutePolicy().due(-1)


def test_hysteresis_keeps_previous_on_a_narrow_switch() -> None:
    policy = ReroutePolicy(hysteresis=0.05)
    prev = torch.tensor([0.6, 0.4])
    narrow = torch.tensor([0.48, 0.52])  # b leads by 0.04 < 0.05
    assert torch.equal(policy.stabilise(prev, narrow), prev)
    clear = torch.tensor([0.4, 0.6])  # b leads by 0.2
    assert torch.equal(policy.stabilise(prev, clear), clear)
    same_top = torch.tensor([0.55, 0.45])  # no switch: weights update freely
    assert torch.equal(policy.stabilise(prev, same_top), same_top)
    assert torch.equal(policy.stabilise(None, narrow), narrow)
    assert torch.equal(ReroutePolicy(hysteresis=0.0).stabilise(prev, narrow), narrow)


def test_hysteresis_edge_cases() -> None:
    policy = ReroutePolicy(hysteresis=0.05)
    prev = torch.tensor([0.6, 0.4])
    base = torch.zeros(2)  # the router chose the base model
    assert torch.equal(policy.stabilise(prev, base), base)
    assert torch.equal(policy.stabilise(base, torch.tensor([0.48, 0.52])), torch.tensor([0.48, 0.52]))
    resized = torch.tensor([0.3, 0.3, 0.4])  # an adapter was added: proposal wins
    assert torch.equal(policy.stabilise(prev, resized), resized)


def test_hysteresis_per_row() -> None:
    policy = ReroutePolicy(hysteresis=0.05)
    prev = torch.tensor([[0.6, 0.4], [0.6, 0.4]])  # [2, 2]
    proposed = torch.tensor([[0.48, 0.52], [0.3, 0.7]])  # row 0 narrow, row 1 clear
    out = policy.stabilise(prev, proposed)
    assert torch.equal(out, torch.tensor([[0.6, 0.4], [0.3, 0.7]]))


def test_no_flapping_over_a_noisy_sequence() -> None:
    policy = ReroutePolicy(hysteresis=0.05)
    current = None
    tops = []
    for p in [0.51, 0.49, 0.52, 0.48, 0.51, 0.30, 0.70]:
        current = policy.stabilise(current, torch.tensor([p, 1 - p]))
        tops.append(int(current.argmax()))
    assert tops == [0, 0, 0, 0, 0, 1, 0]


def test_trace_merges_consecutive_equal_steps() -> None:
    trace = RoutingTrace()
    for t in range(4):
        trace.record(t, {"prose": 0.9, "code": 0.1})
    trace.record(4, {"prose": 0.89, "code": 0.11})  # within tolerance: same segment
    trace.record(5, {"prose": 0.2, "code": 0.8})
    trace.record(6, {"prose": 0.21, "code": 0.79})
    assert trace.segments() == [
        {"start_token": 0, "end_token": 5, "weights": {"prose": 0.9, "code": 0.1}, "confidence": 0.9},
        {"start_token": 5, "end_token": 7, "weights": {"prose": 0.2, "code": 0.8}, "confidence": 0.8},
    ]
    assert trace.last_weights == {"prose": 0.21, "code": 0.79}


def test_trace_splits_on_weight_change_with_same_top() -> None:
    trace = RoutingTrace(tolerance=0.02)
    trace.record(0, {"a": 0.9, "b": 0.1})
    trace.record(2, {"a": 0.7, "b": 0.3})  # same top, weights moved by 0.2
    segs = trace.segments(end_token=4)
    assert [(s["start_token"], s["end_token"]) for s in segs] == [(0, 2), (2, 4)]


def test_trace_rounding_and_end_token() -> None:
    trace = RoutingTrace()
    trace.record(0, {"a": 0.123456789, "b": 0.876543211})
    trace.record(2, {"a": 0.123456789, "b": 0.876543211})  # decisions only every 2 tokens
    assert trace.segments() == [{"start_token": 0, "end_token": 3, "weights": {"a": 0.1235, "b": 0.8765},
                                  "confidence": 0.8765}]
    assert trace.segments(end_token=10)[0]["end_token"] == 10


def test_trace_base_model_and_errors() -> None:
    trace = RoutingTrace()
    assert trace.segments() == []
    trace.record(0, {})  # no adapter (below min_similarity)
    trace.record(1, {"a": 1.0})
    trace.record(1, {"a": 0.5, "b": 0.5})  # re-decided for the same token: later wins
    assert len(trace) == 2
    segs = trace.segments()
    assert [(s["start_token"], s["end_token"], s["weights"]) for s in segs] == [
        (0, 1, {}),
        (1, 2, {"a": 0.5, "b": 0.5}),
    ]
    with pytest.raises(ValueError):
        trace.record(0, {"a": 1.0})


def test_weights_dict() -> None:
    assert weights_dict(["a", "b", "c"], torch.tensor([0.75, 0.0, 0.25])) == {"a": 0.75, "c": 0.25}
    with pytest.raises(ValueError):
        weights_dict(["a"], torch.tensor([0.5, 0.5]))


def test_switch_margin_on_scores() -> None:
    """A boosted, nearly one-hot proposal always clears the weight hysteresis; the switch margin
    on the router's scores is what keeps a slim lead from taking the mixture over."""
    policy = ReroutePolicy(hysteresis=0.05)
    prev = torch.tensor([0.95, 0.05])
    proposed = torch.tensor([0.05, 0.95])  # a full switch in weights
    slim = torch.tensor([0.30, 0.34])  # b's score leads by 0.04
    assert torch.equal(policy.stabilise(prev, proposed, slim), proposed)  # no margin: switch
    assert torch.equal(policy.stabilise(prev, proposed, slim, switch_margin=0.1), prev)
    clear = torch.tensor([0.20, 0.34])  # b leads by 0.14
    assert torch.equal(policy.stabilise(prev, proposed, clear, switch_margin=0.1), proposed)
    same_top = torch.tensor([0.9, 0.1])  # no switch: the margin does not apply
    assert torch.equal(policy.stabilise(prev, same_top, torch.tensor([0.3, 0.29]), switch_margin=0.1), same_top)
    rows = policy.stabilise(torch.stack([prev, prev]), torch.stack([proposed, proposed]),
                            torch.stack([slim, clear]), switch_margin=0.1)  # per row
    assert torch.equal(rows, torch.stack([prev, proposed]))


# -- one routing interface: every router kind behind `Router`, one policy from embedding to gates --
def _centroid(margin: float = 0.0):
    from router_core.centroid import CentroidRouter

    cents = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])]
    return CentroidRouter(["a", "b", "c"], cents, temperature=0.1, switch_margin=margin)


def _mlp():
    from router_core.mlp import MLPRouter, MLPRouterNet

    torch.manual_seed(0)
    return MLPRouter(MLPRouterNet(3, 3, 0), ["a", "b", "c"], "base:32")


def test_every_router_kind_implements_the_protocol() -> None:
    from router_core.router import Router

    for router in (_centroid(), _mlp()):
        assert isinstance(router, Router), type(router).__name__
        x = torch.randn(2, 3)
        assert router.scores(x).shape == router.route(x).shape == (2, 3)
        assert not router.needs_complexity
    assert _mlp().switch_margin == 0.0 and _centroid(0.2).switch_margin == 0.2


def test_decide_renormalises_over_the_adapters_a_row_holds() -> None:
    policy = ReroutePolicy(hysteresis=0.0)
    x = torch.tensor([[0.9, 0.5, 0.1]])
    full = policy.decide(_centroid(), x, {"a", "b", "c"})
    assert full.names == ("a", "b", "c") and abs(sum(full.gates.values()) - 1) < 1e-6
    held = policy.decide(_centroid(), x, {"b", "c"})  # "a" was added after the row started
    assert "a" not in held.gates and abs(sum(held.gates.values()) - 1) < 1e-6
    expected = {n: full.gates[n] / (full.gates["b"] + full.gates["c"]) for n in ("b", "c")}
    assert held.gates == pytest.approx(expected)
    assert policy.decide(_centroid(), x, set()).gates == {}  # nothing held: the base model


def test_decide_applies_the_routers_switch_margin() -> None:
    policy = ReroutePolicy(hysteresis=0.0)
    first = policy.decide(_centroid(0.5), torch.tensor([[1.0, 0.0, 0.0]]), {"a", "b", "c"})
    assert max(first.gates, key=first.gates.get) == "a"
    slim = torch.tensor([[0.70, 0.72, 0.0]])  # b leads a by a sliver of score
    kept = policy.decide(_centroid(0.5), slim, {"a", "b", "c"}, previous=first.vector, previous_names=first.names)
    assert torch.equal(kept.vector, first.vector)
    switched = policy.decide(_centroid(0.0), slim, {"a", "b", "c"}, previous=first.vector, previous_names=first.names)
    assert max(switched.gates, key=switched.gates.get) == "b"
    other = policy.decide(_centroid(0.5), slim, {"a", "b", "c"}, previous=first.vector, previous_names=("x",))
    assert max(other.gates, key=other.gates.get) == "b"  # the router was rebuilt: no holding back


def test_cadence_is_the_request_s_or_the_policy_s() -> None:
    policy = ReroutePolicy(every=4)
    assert policy.cadence(None) == 4 and policy.cadence(0) == 0 and policy.cadence(3) == 3
    assert [policy.due(n, 3) for n in range(4)] == [True, False, False, True]
    with pytest.raises(ValueError):
        policy.cadence(-1)
