"""The server's gater keeps a row's adapter unless a re-route's score beats it by the centroid
router's fitted switch margin (the rule `switchboard-train eval` applies too)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.build import build_routing
from server.engine.base_model import load_base_model
from server.engine.sampling import SamplingParams
from server.engine.sequence import RoutingSpec, Sequence
from server.settings import RoutingSettings
from tests.server.engine.test_reroute_cadence import _registry


def _gated(gater, seq: Sequence, embedding: torch.Tensor) -> str:
    seq.route.hidden_tail = embedding[None]  # [1, d]: the base embedder pools it to `embedding`
    seq.route.gates = gater.route([seq])[0]
    return max(seq.route.gates, key=seq.route.gates.__getitem__)


def test_gater_applies_the_fitted_switch_margin(store, tiny_model_dir, one_torch_thread):
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    registry = _registry(store, resident)
    torch.manual_seed(0)
    d = resident.model.config.n_embd
    axes = torch.eye(d)[:2]  # alpha along axis 0, beta along axis 1
    for version, axis in zip(sorted(registry.snapshot().values(), key=lambda v: v.name), axes, strict=True):
        version.weights.centroids = F.normalize(axis + 0.08 * torch.randn(20, d), dim=-1)  # 20 rows: voting
    arc = [F.normalize(torch.cos(a) * axes[0] + torch.sin(a) * axes[1], dim=0)
           for a in torch.linspace(0, torch.pi / 2, 91)]  # from alpha to beta
    fitted = 0.0
    for margin_setting in (None, 0.0):  # fitted (the default), off
        catalogue, gater = build_routing(RoutingSettings(embedder="base", route_switch_margin=margin_setting),
                                         resident, registry, store)
        for version in registry.snapshot().values():
            version.weights.centroid_embedder = catalogue.embedder_id
        catalogue.rebuild()
        router = catalogue.router("centroid")
        assert router is not None and router.voting
        margin = router.switch_margin
        if margin_setting is None:
            assert margin > 0
            fitted = margin  # the off run below reuses the fitted run's probes
        else:
            assert margin == 0.0
        lead = [float(s[1] - s[0]) for s in router.scores(torch.stack(arc))]  # beta's score over alpha's
        slim = next(x for x, m in zip(arc, lead, strict=True) if 0.02 < m < fitted / 2)
        clear = next(x for x, m in zip(arc, lead, strict=True) if m > 1.5 * fitted)
        seq = Sequence(prompt_ids=[5, 17], max_tokens=8, sampling=SamplingParams(temperature=0.0),
                       routing=RoutingSpec("auto", router="centroid", reroute_every=2),
                       decode=lambda ids: "x" * len(ids), emit=lambda ev: None)
        seq.versions = {v.name: v for v in registry.acquire(["alpha", "beta"])}
        assert _gated(gater, seq, arc[0]) == "alpha"  # the first decision
        if margin_setting is None:
            assert _gated(gater, seq, slim) == "alpha"  # beta leads, by less than the margin: kept
            assert _gated(gater, seq, clear) == "beta"  # by more: switched
        else:
            assert _gated(gater, seq, slim) == "beta"  # no margin: the slim lead switches
        registry.release(list(seq.versions.values()))
