"""The static-shape decode step (`server.engine.static_step`): the same numbers as `gpt2.forward`,
the same tokens through the engine, and no recompile once warmed up, whatever re-routing and hot
swaps do to the gates and the adapter factors.

Recompiles are counted at the dynamo level with a counting backend (what triggers a recompile is
a guard failing on the inputs, which does not depend on the backend), so that test runs in
seconds; one test compiles for real with inductor's C++ backend on the tiny model.
"""

from __future__ import annotations

import pytest
import torch

from server.engine import gpt2
from server.engine.adapter_weights import BaseSpec
from server.engine.base_model import load_base_model
from server.engine.batch import padded
from server.engine.engine import Engine, EngineConfig
from server.engine.registry import AdapterRegistry
from server.engine.static_step import StaticDecoder, bucket
from server.store.folder import read_adapter
from tests.handle import AppHandle
from tests.server.engine.rows import PROMPT, hold, row, token_ids
from tests.tiny import make_adapter, run_engine


def _registry(store, tiny_model_dir, resident):
    make_adapter(tiny_model_dir, store / "gamma", seed=3, rank=2, alpha=2, targets=("c_attn", "c_proj", "c_fc"))
    registry = AdapterRegistry()
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64)
    for name in ("alpha", "beta", "gamma"):
        registry.register(read_adapter(name, store / name, spec))
    return registry, spec


@pytest.fixture()
def engines(store, tiny_model_dir):
    """An eager engine and a static-step engine over separate copies of the tiny model (fp32)."""
    out = {}
    for step in ("eager", "static"):
        resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
        registry, _ = _registry(store, tiny_model_dir, resident)
        out[step] = Engine(resident, registry, EngineConfig(max_loras=4, decode_step=step))
    return out


def _prefill(engine: Engine, prompts: list[list[int]]) -> None:
    ids, pos, last = padded(prompts, engine.resident.device)
    engine.cache.reserve(len(prompts), 128)
    with torch.inference_mode():
        gpt2.forward(engine.resident.model, ids, pos, engine.cache, last=last)


def _set(engine: Engine, weights: list[dict[str, float]]) -> None:
    names = sorted({n for w in weights for n in w})
    versions = [engine.registry.get(n) for n in names]
    gates = torch.tensor([[w.get(n, 0.0) for n in names] for w in weights])
    engine.ctx.set(tuple(engine.slots.ensure(versions)), gates, None)


def test_bucket():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]
    assert bucket(3, 16) == 16 and bucket(17, 16) == 32


def test_static_step_equals_gpt2_forward(engines):
    """Rows at different positions, mixtures, a base row with zero gates, an adapter that targets
    c_fc (gamma) beside ones that do not: every step's logits and hidden states match."""
    eager, static = engines["eager"], engines["static"]
    prompts = [PROMPT, PROMPT[:4], [7, 7, 7], PROMPT[2:]]
    weights = [{"alpha": 1.0}, {"alpha": 0.3, "gamma": 0.7}, {}, {"beta": 0.5, "gamma": 0.5}]
    for e in (eager, static):
        _prefill(e, prompts)
    ids = torch.tensor([[5], [6], [7], [8]])
    pos = torch.tensor([[len(p)] for p in prompts])
    for step in range(6):
        if step == 3:  # re-route: other gates, another active set
            weights = [{"beta": 1.0}, {"alpha": 0.5, "beta": 0.5}, {"gamma": 1.0}, {}]
        with torch.inference_mode():
            _set(eager, weights)
            ref_logits, ref_hidden = gpt2.forward(eager.resident.model, ids, pos, eager.cache)
            _set(static, weights)
            logits, hidden = static._forward(ids, pos, 0)
        assert static.static is not None and static.static.calls == step + 1  # the static step really ran
        assert logits.shape == ref_logits.shape and hidden.shape == ref_hidden.shape
        assert torch.allclose(logits, ref_logits, atol=1e-5), (logits - ref_logits).abs().max()
        assert torch.allclose(hidden, ref_hidden, atol=1e-5)
        ids, pos = ref_logits.argmax(-1, keepdim=True), pos + 1


def test_static_engine_generates_what_the_eager_engine_does(engines):
    specs = [(PROMPT, {"alpha": 1.0}, 12), (PROMPT[:4], {"beta": 1.0}, 3), ([7, 7, 7, 7, 7, 7, 7], {}, 9),
             (PROMPT[2:], {"alpha": 0.3, "gamma": 0.7}, 5), ([1, 2, 3], {"alpha": 0.5, "beta": 0.5}, 14)]
    results = {}
    for name, engine in engines.items():
        seqs = [hold(engine, row(p, w, max_tokens=n)) for p, w, n in specs]
        events = run_engine(engine, seqs)
        results[name] = ([token_ids(events[s.id]) for s in seqs],
                         [torch.tensor([e.logprob for e in events[s.id]]) for s in seqs])
    assert results["static"][0] == results["eager"][0]
    for got, ref in zip(results["static"][1], results["eager"][1], strict=True):
        assert torch.allclose(got, ref, atol=1e-5)
    assert engines["static"].static is not None and engines["static"].static.calls > 0


class _CountingBackend:
    """A torch.compile backend that runs the captured graph eagerly and counts compilations."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.compiles += 1
        return gm.forward


def _warmed_up(store, tiny_model_dir, backend) -> tuple[Engine, AdapterRegistry, BaseSpec, int]:
    """An engine whose static step compiles through `backend`, warmed up for batch buckets 1 and 8;
    with the compile count the warm-up left."""
    torch._dynamo.reset()
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    registry, spec = _registry(store, tiny_model_dir, resident)
    engine = Engine(resident, registry, EngineConfig(max_loras=4, max_batch_size=8))
    engine.static = StaticDecoder(resident.model, engine.cache, engine.slots, engine.ctx, compile=True,
                                  backend=backend)
    engine.static.warm_up([1, 8])
    return engine, registry, spec, backend.compiles


def test_no_recompile_after_warm_up_under_rerouting_and_hot_swaps(store, tiny_model_dir):
    counter = _CountingBackend()
    engine, registry, spec, warm = _warmed_up(store, tiny_model_dir, counter)
    assert warm >= 1
    # Batches of 1, 3 and 5 rows (buckets 1, 4, 8), fixed adapters and routed mixtures, long enough
    # to cross length buckets (64 -> 128) and grow the cache.
    seqs = [hold(engine, row(PROMPT, {"alpha": 1.0}, max_tokens=70))]
    run_engine(engine, seqs)
    mixes = [{"alpha": 0.5, "beta": 0.5}, {"gamma": 1.0}, {"alpha": 0.2, "beta": 0.3, "gamma": 0.5}, {}, {"beta": 1.0}]
    seqs = [hold(engine, row(PROMPT[: 3 + i], mixes[i % len(mixes)], max_tokens=10 + 5 * i)) for i in range(5)]
    run_engine(engine, seqs)
    # Re-routing: the same rows with other gates every step (what the router does).
    seqs = [hold(engine, row(PROMPT, mixes[i], max_tokens=12)) for i in range(3)]
    for s in seqs:
        engine.submit(s)
    step = 0
    while engine.has_work():
        engine.step()
        step += 1
        for i, s in enumerate(engine.running):  # rotate the mixtures, as a re-route would
            s.route.gates = {k: v for k, v in mixes[(i + step) % 3].items()}
            s.versions.update({k: engine.registry.get(k) for k in s.route.gates if k not in s.versions})
    # Hot swap: a new version of alpha under the same name, installed into a slot mid-serving.
    new_alpha, old = registry.register(read_adapter("alpha", store / "beta", spec))
    assert old is not None
    seqs = [hold(engine, row(PROMPT, {"alpha": 1.0}, max_tokens=6)), hold(engine, row(PROMPT, {"gamma": 1.0}))]
    run_engine(engine, seqs)
    # Mixtures whose ranks add up past the smallest rank bucket (16 + 8 -> 32, as 4 routed r16
    # adapters give 64), alone (batch 1, a graph of its own) and beside other rows.
    make_adapter(tiny_model_dir, store / "delta", seed=4, rank=16, alpha=16, targets=("c_attn", "c_proj"))
    registry.register(read_adapter("delta", store / "delta", spec))
    run_engine(engine, [hold(engine, row(PROMPT, {"delta": 0.5, "beta": 0.5}, max_tokens=6))])
    run_engine(engine, [hold(engine, row(PROMPT[: 4 + i], {"delta": 0.7, "alpha": 0.3}, max_tokens=5)) for i in range(3)])
    assert engine.static.calls > 100
    assert counter.compiles == warm, f"{counter.compiles - warm} recompiles after warm-up"


class _CountingInductor:
    """Inductor, counting compilations: the guards inductor adds while lowering (e.g. a bound on a
    size it saw only once) decide recompiles too, and the counting backend above never adds them."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs)


@pytest.mark.slow
def test_no_inductor_recompile_when_a_mixture_outgrows_the_smallest_rank_bucket(store, tiny_model_dir):
    """The benchmark's case (4 routed r16 adapters: rank 64) after a warm-up without adapters: a
    batch-1 graph compiled at rank 16 alone carried `R <= 16` and recompiled mid-serving."""
    counter = _CountingInductor()
    engine, registry, spec, warm = _warmed_up(store, tiny_model_dir, counter)
    make_adapter(tiny_model_dir, store / "delta", seed=4, rank=16, alpha=16, targets=("c_attn", "c_proj"))
    registry.register(read_adapter("delta", store / "delta", spec))
    run_engine(engine, [hold(engine, row(PROMPT, {"delta": 0.5, "beta": 0.5}, max_tokens=6))])
    run_engine(engine, [hold(engine, row(PROMPT[: 4 + i], {"delta": 0.7, "alpha": 0.3}, max_tokens=5))
                        for i in range(3)])
    # Long rows: the cache grows past the attended length (64 of 128 positions), then the length
    # bucket catches up with it (128 of 128), at batch 1 and 3, with small and large mixtures.
    for weights in ({"alpha": 1.0}, {"delta": 0.5, "beta": 0.5}):
        run_engine(engine, [hold(engine, row(PROMPT, weights, max_tokens=100))])
        run_engine(engine, [hold(engine, row(PROMPT[: 4 + i], weights, max_tokens=90)) for i in range(3)])
    assert counter.compiles == warm, f"{counter.compiles - warm} recompiles after warm-up"


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager(engines, store, tiny_model_dir):
    """The real thing on the tiny model: inductor's C++ backend; same tokens and log-probs as the
    eager engine, and one warm-up covers batches of 1 and several rows."""
    torch._dynamo.reset()
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    registry, _ = _registry(store, tiny_model_dir, resident)
    compiled = Engine(resident, registry, EngineConfig(max_loras=4, max_batch_size=4, decode_step="compiled"))
    assert compiled.warm_up() > 0
    specs = [(PROMPT, {"alpha": 1.0}, 8), (PROMPT[:4], {"beta": 0.5, "gamma": 0.5}, 5), ([7, 7, 7], {}, 6)]
    out = {}
    for name, engine in (("eager", engines["eager"]), ("compiled", compiled)):
        seqs = [hold(engine, row(p, w, max_tokens=n)) for p, w, n in specs]
        events = run_engine(engine, seqs)
        alone = hold(engine, row(PROMPT, {"alpha": 0.7, "beta": 0.3}, max_tokens=5))
        events.update(run_engine(engine, [alone]))
        out[name] = [[(e.token_id, e.logprob) for e in events[s.id] if e.token_id is not None] for s in [*seqs, alone]]
    for got, ref in zip(out["compiled"], out["eager"], strict=True):
        assert [t for t, _ in got] == [t for t, _ in ref]
        assert torch.allclose(torch.tensor([lp for _, lp in got]), torch.tensor([lp for _, lp in ref]), atol=1e-4)


def test_server_warms_the_step_up_before_ready_and_serves_through_it(store, tiny_model_dir, monkeypatch, caplog):
    """`--compile on` path of the app with the step run eagerly (compiling is the slow test above):
    the warm-up runs, and is logged, before /ready; completions then go through the static step
    and equal those of the eager engine."""
    import logging

    from fastapi.testclient import TestClient

    from server import build
    from server.app import create_app
    from tests.tiny import app_settings

    body = {"model": "alpha", "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}
    with TestClient(create_app(app_settings(tiny_model_dir, store))) as client:
        reference = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    monkeypatch.setattr(build, "step_for", lambda setting, device: "static")
    caplog.set_level(logging.INFO, logger="server.engine.static_step")
    with TestClient(create_app(app_settings(tiny_model_dir, store, engine={"compile": "on"}))) as client:
        assert any("decode step warmed up" in r.getMessage() for r in caplog.records)
        assert client.get("/ready").status_code == 200
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        engine = AppHandle(client.app).engine
        assert engine.static is not None and engine.static.calls > 1
        assert r.json()["choices"][0]["text"] == reference


def test_compile_setting():
    from server.engine.static_step import decode_step

    assert decode_step("on", torch.device("cpu")) == "compiled"
    assert decode_step("off", torch.device("cpu")) == "eager"
    assert decode_step("auto", torch.device("cpu")) == "eager"
    assert decode_step("auto", torch.device("cuda")) == "compiled"  # CUDA graphs (docs/performance.md)
    assert decode_step("off", torch.device("cuda")) == "eager"
