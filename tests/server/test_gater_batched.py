"""A re-route step routes its rows together (`Gater.route`: one policy call per router and request
options, one host read for all rows, docs/performance.md finding 9), and each row gets exactly
what it gets routed alone: centroid rows held back by the switch margin, MLP rows, request
overrides of temperature and top-k, an Arrow row and a row whose router is gone, in one batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from router_core.mlp import MLPRouter, MLPRouterNet
from server.build import build_routing
from server.engine.base_model import load_base_model
from server.engine.sampling import SamplingParams
from server.engine.sequence import RoutingSpec, Sequence
from server.routing.catalogue import RouterCatalogue
from server.routing.gater import Gater
from server.settings import RoutingSettings
from tests.server.engine.test_reroute_cadence import _registry


def routed(store, model_dir, switch_margin: float | None = 0.01):
    """(resident, registry, catalogue, gater) on the base embedder: a voting centroid router over
    `alpha` and `beta` (20 random rows each) and an MLP router `m` over both (random weights)."""
    resident = load_base_model(str(model_dir), "cpu", "float32")
    registry = _registry(store, resident)
    catalogue, gater = build_routing(RoutingSettings(embedder="base", route_switch_margin=switch_margin),
                                     resident, registry, store)
    torch.manual_seed(0)
    for version in registry.snapshot().values():
        version.weights.centroids = F.normalize(torch.randn(20, catalogue.dim), dim=-1)
        version.weights.centroid_embedder = catalogue.embedder_id
    catalogue.rebuild()
    catalogue.mlp = {"m": MLPRouter(MLPRouterNet(catalogue.dim, 2, 0, hidden=16).eval(), ["alpha", "beta"],
                                    catalogue.embedder_id)}
    return resident, registry, catalogue, gater


def auto_row(registry, router: str, prompt: list[int], every: int = 1, **options) -> Sequence:
    seq = Sequence(prompt_ids=list(prompt), max_tokens=30, sampling=SamplingParams(temperature=0.0),
                   routing=RoutingSpec("auto", router=router, reroute_every=every, **options),
                   decode=lambda ids: "x" * len(ids), emit=lambda ev: None)
    seq.versions = {v.name: v for v in registry.acquire(["alpha", "beta"])}
    return seq


def _close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 for k in a)


@pytest.fixture()
def parts(store, tiny_model_dir):
    return routed(store, tiny_model_dir, switch_margin=0.5)  # a wide margin: most switches are held back


def test_rows_routed_together_get_what_each_gets_alone(parts, monkeypatch):
    _, registry, catalogue, gater = parts
    assert isinstance(gater, Gater) and isinstance(catalogue, RouterCatalogue)
    specs = [("centroid", {}), ("m", {}), ("centroid", {"temperature": 0.3, "top_k": 1}), ("centroid", {}),
             ("m", {"top_k": 1}), ("arrow", {}), ("m", {}), ("gone", {}), ("centroid", {})]
    together = [auto_row(registry, name, [5, 17, 42], **options) for name, options in specs]
    gone = together[7]
    gone.route.gates = {"beta": 1.0}  # what it had before its router was unloaded
    alone = [copy.deepcopy(s) for s in together]
    d = catalogue.dim
    torch.manual_seed(1)
    base = [torch.randn(4, d) for _ in specs]
    held_back = 0
    calls: list[int] = []
    real_route = type(catalogue.router("centroid")).route

    def counted(self, embeddings, *args, **kwargs):
        calls.append(embeddings.shape[0])
        return real_route(self, embeddings, *args, **kwargs)

    monkeypatch.setattr(type(catalogue.router("centroid")), "route", counted)
    for step in range(6):
        tails = [b + 0.6 * step * torch.randn(4, d) for b in base]  # the windows drift: some tops switch
        for seqs in (together, alone):
            for seq, tail in zip(seqs, tails, strict=True):
                seq.route.hidden_tail = tail
        calls.clear()
        batched = gater.route(together)
        assert sorted(calls) == [1, 3], calls  # centroid rows: one call per request options
        solo = [gater.route([seq])[0] for seq in alone]
        for i, (a, b) in enumerate(zip(batched, solo, strict=True)):
            assert _close(a, b), (step, specs[i], a, b)
            va, vb = together[i].route.route_vector, alone[i].route.route_vector
            assert (va is None) == (vb is None) and (va is None or torch.allclose(va, vb, atol=1e-6))
        newcomers = [auto_row(registry, "centroid", [5, 17, 42]) for _ in (0, 3, 8)]
        for seq, i in zip(newcomers, (0, 3, 8), strict=True):
            seq.route.hidden_tail = tails[i]
        fresh = gater.route(newcomers)  # the same windows without a previous decision
        registry.release([v for seq in newcomers for v in seq.versions.values()])
        for j, i in enumerate((0, 3, 8)):
            if max(fresh[j], key=fresh[j].__getitem__) != max(batched[i], key=batched[i].__getitem__):
                held_back += 1  # the switch margin kept this row's previous top
        for seq, gates in zip(together + alone, batched + solo, strict=True):
            seq.route.gates = gates
    assert batched[7] == {"beta": 1.0}  # the row whose router is gone keeps its gates
    assert batched[5] == {"alpha": 0.5, "beta": 0.5}  # Arrow: uniform over the candidates
    assert held_back > 0, "the switch margin never held a row back: the test lost its point"
