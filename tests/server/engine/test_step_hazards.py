"""CPU tests for what would go wrong on a GPU (docs/performance.md, "CUDA readiness"):

- every tensor the compiled decode step reads is a per-step input or a static address (CUDA
  graphs copy anything else into their own buffers on every replay: all the weights, each step),
  and a cache allocated up front never moves while the engine serves;
- a steady-state decode step reads the device back at most twice (each read is a host sync on
  CUDA), counted with a `TorchFunctionMode` over `item`, `tolist`, `__int__`, `__bool__`, ...;
- the warm-up and the decode steps of a server run on one thread (CUDA graph trees are per
  thread).
"""

from __future__ import annotations

import threading

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
