"""CPU tests for what would go wrong on a GPU (docs/performance.md, "CUDA readiness"):

- every tensor the compiled decode step reads is a per-step input or a static address (CUDA
  graphs copy anything else into their own buffers on every replay: all the weights, each step),
  and a cache allocated up front never moves while the engine serves;
- a steady-state decode step reads the device back at most twice (each read is a host sync on
  CUDA), counted with a `TorchFunctionMode` over `item`, `tolist`, `__int__`, `__bool__`, ...;
  the static step and the eager one alike, and a step where every row re-routes (centroid and
  MLP routers) once more, however many rows it has;
- the warm-up and the decode steps of a server run on one thread (CUDA graph trees are per
  thread).
"""

from __future__ import annotations

import threading

import pytest
import torch

from server.engine.static_step import StaticDecoder
from tests.server.engine.rows import PROMPT, held_row, tiny_engine
from tests.syncs import SyncCounter
from tests.tiny import run_engine


class _Recorder:
    """A torch.compile backend that runs the graph eagerly and keeps its example inputs."""

    def __init__(self) -> None:
        self.inputs: list[list] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.inputs.append(list(example_inputs))
        return gm.forward


def test_compiled_step_reads_only_per_step_inputs_and_static_addresses(store, tiny_model_dir):
    torch._dynamo.reset()
    engine = tiny_engine(store, tiny_model_dir, max_batch_size=4, full_cache=True)
    recorder = _Recorder()
    engine.static = StaticDecoder(engine.resident.model, engine.cache, engine.slots, engine.ctx, compile=True,
                                  backend=recorder, static_addresses=True)
    per_step: list[int] = []  # ids of the tensors `inputs()` made or chose for a step
    real_inputs = engine.static.inputs

    def inputs(*args, **kwargs):
        out = real_inputs(*args, **kwargs)
        per_step.extend(id(t) for v in out.values() for t in (v if isinstance(v, list) else [v])
                        if isinstance(t, torch.Tensor) and not any(t is c for c in (*engine.cache.keys,
                                                                                  *engine.cache.values)))
        return out

    engine.static.inputs = inputs  # type: ignore[method-assign]
    engine.static.warm_up([1, 4])
    cache = [t.data_ptr() for t in (*engine.cache.keys, *engine.cache.values)]
    seqs = [held_row(engine, PROMPT, {"alpha": 1.0}, max_tokens=80),
            held_row(engine, PROMPT[:4], {"alpha": 0.5, "beta": 0.5}, max_tokens=30)]
    run_engine(engine, seqs)
    assert engine.static.calls >= 79  # every decode step of the longer row
    assert [t.data_ptr() for t in (*engine.cache.keys, *engine.cache.values)] == cache, "the cache moved"
    tensors = [t for graph in recorder.inputs for t in graph if isinstance(t, torch.Tensor)]
    assert tensors
    stray = [tuple(t.shape) for t in tensors
             if id(t) not in per_step and getattr(t, "_dynamo_static_input_type", None) is None]
    assert not stray, f"tensors the compiled step reads that are neither per-step inputs nor static: {stray}"
    weights = {id(t) for t in engine.static.static_tensors()}
    assert weights <= {id(t) for t in tensors}, "the step reads the model's own parameters, not copies"


def test_a_steady_state_decode_step_syncs_at_most_twice(store, tiny_model_dir, monkeypatch):
    """Fixed mixtures, greedy and sampled rows (the device sampler forced on CPU, as on CUDA), the
    static step: past the prefill, each step reads the device back at most twice (finite check,
    tokens)."""
    from server.engine import tokens

    monkeypatch.setattr(tokens, "DEVICE_SAMPLING_ON_CPU", True)
    engine = tiny_engine(store, tiny_model_dir, max_batch_size=4, decode_step="static", full_cache=True)
    engine.warm_up()
    seqs = [held_row(engine, PROMPT, {"alpha": 1.0}, max_tokens=30),
            held_row(engine, PROMPT[:5], {"alpha": 0.5, "beta": 0.5}, max_tokens=30, temperature=0.8, seed=3),
            held_row(engine, PROMPT[:3], {}, max_tokens=30, temperature=1.0, top_p=0.9, top_logprobs=2)]
    for seq in seqs:
        seq.emit = lambda ev: None
        engine.submit(seq)
    engine.step()  # prefill
    engine.step()
    steps = 10
    with SyncCounter() as counter:
        for _ in range(steps):
            engine.step()
    assert all(s.finish_reason is None for s in seqs) and engine.static is not None and engine.static.calls > steps
    assert counter.total <= 2 * steps, dict(counter.sites)


def _steady_syncs(engine, seqs, steps: int = 8) -> SyncCounter:
    """Submit `seqs`, step past the prefill, then count the device reads of `steps` steps."""
    for seq in seqs:
        seq.emit = lambda ev: None
        engine.submit(seq)
    engine.step()  # prefill
    engine.step()
    with SyncCounter() as counter:
        for _ in range(steps):
            engine.step()
    assert all(s.finish_reason is None for s in seqs)
    return counter


def test_an_eager_decode_step_syncs_at_most_twice(store, tiny_model_dir, monkeypatch):
    """The eager step (`gpt2.forward`, used by --compile off/auto on CPU, int8 and Arrow rows) takes
    each row's start position from the host: no reads of `positions` beside the finite check and
    the tokens."""
    from server.engine import tokens

    monkeypatch.setattr(tokens, "DEVICE_SAMPLING_ON_CPU", True)
    engine = tiny_engine(store, tiny_model_dir, max_batch_size=4, decode_step="eager")
    seqs = [held_row(engine, PROMPT, {"alpha": 1.0}, max_tokens=30),
            held_row(engine, PROMPT[:5], {"alpha": 0.5, "beta": 0.5}, max_tokens=30, temperature=0.8, seed=3),
            held_row(engine, PROMPT[:3], {}, max_tokens=30, temperature=1.0, top_p=0.9, top_logprobs=2)]
    steps = 8
    counter = _steady_syncs(engine, seqs, steps)
    assert engine.static is None
    assert counter.total <= 2 * steps, dict(counter.sites)


@pytest.mark.parametrize("decode_step", ["eager", "static"])
def test_a_reroute_step_reads_back_once_however_many_rows(store, tiny_model_dir, monkeypatch, decode_step):
    """Every row re-routes at every step (`reroute_every=1`), half on the centroid router (voting,
    with a switch margin: scores as well as weights), half on an MLP router: 2 rows or 6, a step
    costs the same reads, one more than a step without routing."""
    from server.engine import tokens
    from server.engine.engine import Engine, EngineConfig
    from tests.server.test_gater_batched import auto_row, routed

    monkeypatch.setattr(tokens, "DEVICE_SAMPLING_ON_CPU", True)
    resident, registry, catalogue, gater = routed(store, tiny_model_dir, switch_margin=0.01)
    assert catalogue.router("centroid").voting and catalogue.router("centroid").switch_margin > 0
    steps, totals = 6, []
    for n in (2, 6):
        engine = Engine(resident, registry, EngineConfig(max_loras=4, max_batch_size=8, decode_step=decode_step,
                                                         full_cache=True), gate_source=gater)
        engine.warm_up()
        seqs = [auto_row(registry, "centroid" if i % 2 else "m", PROMPT[i % 3:]) for i in range(n)]
        counter = _steady_syncs(engine, seqs, steps)
        assert all(s.route.reroutes == len(s.generated) > steps for s in seqs)  # routed before every token
        assert {s.routing.router for s in seqs} == {"centroid", "m"}
        totals.append(counter.total)
        assert counter.total <= 3 * steps, dict(counter.sites)
    assert totals[0] == totals[1], totals


def test_server_warms_up_and_decodes_on_one_thread(store, tiny_model_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from server import build
    from server.app import create_app
    from tests.tiny import app_settings

    threads: list[str] = []
    real = StaticDecoder._forward

    def forward(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StaticDecoder, "_forward", forward)
    monkeypatch.setattr(build, "step_for", lambda setting, device: "static")
    with TestClient(create_app(app_settings(tiny_model_dir, store, engine={"compile": "on"}))) as client:
        warm = len(threads)
        r = client.post("/v1/completions", json={"model": "alpha", "prompt": "def add(a, b):", "max_tokens": 6,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
    assert warm >= 1 and len(threads) > warm
    assert set(threads) == {"switchboard-engine"}, set(threads)
