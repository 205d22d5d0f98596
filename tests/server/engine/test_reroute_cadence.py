"""The re-route cadence is stated once (`router_core.policy.last_reroute`): the engine routes a
row exactly where `reroute_due` says, on its own thread (base embedder, through the server's
`Gater` over a `RouterCatalogue`) and one step ahead on the side thread (a text embedder), and
the routed-perplexity evaluation assumes the same decisions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from router_core.policy import ReroutePolicy, last_reroute, reroute_due
from server.build import build_routing
from server.engine.adapter_weights import BaseSpec
from server.engine.base_model import load_base_model
from server.engine.engine import Engine, EngineConfig
from server.engine.registry import AdapterRegistry
from server.engine.sampling import SamplingParams
from server.engine.sequence import RoutingSpec, Sequence
from server.settings import RoutingSettings
from server.store.folder import read_adapter
from tests.tiny import run_engine
from training.eval_perplexity import context_length

PROMPT = [5, 17, 42, 8, 99, 3, 250, 11, 64]
MAX_TOKENS = 9


class RouteLog:
    """An engine observer that records, per row, how many tokens it had generated at each route."""

    def __init__(self) -> None:
        self.at: dict[int, list[int]] = {}

    def on_step(self, batch_size: int, queue_depth: int) -> None:
        pass

    def on_token(self, seq: Sequence, now: float) -> None:
        pass

    def on_route(self, seq: Sequence, weights: dict[str, float], switched: bool, seconds: float) -> None:
        self.at.setdefault(seq.id, []).append(len(seq.generated))

    def on_finish(self, seq: Sequence) -> None:
        pass


class TextGates:
    """A gate source routed on text (as a sentence encoder is), so the engine starts its re-routes
    a step early on the side thread; the gates alternate between the two adapters by context."""

    def needs_hidden(self, seq: Sequence) -> bool:
        return False

    def contexts(self, seqs: list[Sequence]) -> list[str]:
        return [str(len(s.prompt_ids) + len(s.generated)) for s in seqs]

    def route(self, seqs: list[Sequence], contexts: list[str] | None = None) -> list[dict[str, float]]:
        contexts = contexts if contexts is not None else self.contexts(seqs)
        return [{"alpha": 1.0} if int(c) % 2 else {"beta": 1.0} for c in contexts]


def _registry(store, resident) -> AdapterRegistry:
    registry = AdapterRegistry()
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64)
    for name in ("alpha", "beta"):
        registry.register(read_adapter(name, store / name, spec))
    return registry


def _rows(registry: AdapterRegistry) -> list[Sequence]:
    rows = []
    for every in (0, 1, 2, 3):
        seq = Sequence(prompt_ids=list(PROMPT[every:]), max_tokens=MAX_TOKENS, sampling=SamplingParams(temperature=0.0),
                       routing=RoutingSpec("auto", router="centroid", reroute_every=every),
                       decode=lambda ids: "x" * len(ids), emit=lambda ev: None)
        seq.versions = {v.name: v for v in registry.acquire(["alpha", "beta"])}
        rows.append(seq)
    return rows


def _expected(seq: Sequence) -> list[int]:
    return [n for n in range(MAX_TOKENS) if reroute_due(n, seq.routing.reroute_every)]


def test_engine_routes_where_the_cadence_says_base_embedder(store, tiny_model_dir, one_torch_thread):
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    registry = _registry(store, resident)
    catalogue, gater = build_routing(RoutingSettings(embedder="base"), resident, registry, store)
    torch.manual_seed(0)
    for version in registry.snapshot().values():
        version.weights.centroids = F.normalize(torch.randn(1, catalogue.dim), dim=-1)
        version.weights.centroid_embedder = catalogue.embedder_id
    catalogue.rebuild()
    assert catalogue.router("centroid") is not None and sorted(catalogue.routable_names()) == ["alpha", "beta"]
    log = RouteLog()
    engine = Engine(resident, registry, EngineConfig(max_loras=4), gate_source=gater, observer=log)
    rows = _rows(registry)
    events = run_engine(engine, rows)
    for seq in rows:
        assert events[seq.id][-1].finish_reason == "length"
        assert log.at[seq.id] == _expected(seq), seq.routing.reroute_every
        assert seq.route.reroutes == len(_expected(seq))


def test_engine_routes_where_the_cadence_says_text_embedder(store, tiny_model_dir, one_torch_thread):
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    registry = _registry(store, resident)
    log = RouteLog()
    engine = Engine(resident, registry, EngineConfig(max_loras=4), gate_source=TextGates(), observer=log)
    rows = _rows(registry)
    events = run_engine(engine, rows)
    for seq in rows:
        assert log.at[seq.id] == _expected(seq), seq.routing.reroute_every
        # decisions from token 2 on were started a step early, on a context one token short
        for ev in events[seq.id]:
            if ev.token_id is None:
                continue
            decided = last_reroute(ev.token_index, seq.routing.reroute_every)
            seen = len(seq.prompt_ids) + (decided - 1 if decided >= 2 else decided)
            assert ev.weights == ({"alpha": 1.0} if seen % 2 else {"beta": 1.0}), (ev.token_index, seq.routing.reroute_every)


@pytest.mark.parametrize("every", [0, 1, 2, 3, 5])
def test_one_cadence_for_policy_engine_and_evaluation(every):
    policy = ReroutePolicy(every=every)
    for n in range(20):
        assert policy.due(n) == reroute_due(n, every) == (last_reroute(n, every) == n)
        assert last_reroute(n, every) <= n and reroute_due(last_reroute(n, every), every)
    prompt, total = 4, 30
    for pos in range(prompt - 1, total):  # the evaluation scores token n with the gates decided at last_reroute(n)
        n = pos - prompt + 1
        assert context_length(pos, prompt, every, total) == min(prompt + last_reroute(n, every), total)
