"""Under `auto`, an adapter indexed at start (factors still on disk) is read off the engine
thread (`server.engine.loader`): a read that blocks does not stop another row from streaming,
the blocked row waits outside the batch and then runs with the same tokens as without the wait,
and a read that fails ends that row alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from server.engine.adapter_weights import BaseSpec
from server.engine.base_model import load_base_model
from server.engine.engine import Engine, EngineConfig
from server.engine.errors import Unavailable
from server.engine.registry import AdapterRegistry
from server.engine.sampling import SamplingParams
from server.engine.sequence import RoutingSpec, Sequence
from server.store.folder import index_adapter

PROMPTS = {"alpha": [5, 17, 42, 8, 99], "beta": [3, 250, 11, 64]}
MAX_TOKENS = 6


class Routes:
    """A stand-in router (the engine's GateSource): `pick(seq)` is each row's mixture."""

    def __init__(self, pick: Callable[[Sequence], dict[str, float]]) -> None:
        self.pick = pick

    def needs_hidden(self, seq: Sequence) -> bool:
        return False

    def contexts(self, seqs: list[Sequence]) -> list[str]:
        return ["" for _ in seqs]

    def route(self, seqs: list[Sequence], contexts: list[str] | None = None) -> list[dict[str, float]]:
        return [self.pick(s) for s in seqs]


# each row to one adapter by its first prompt token
BY_PROMPT = Routes(lambda s: {"alpha": 1.0} if s.prompt_ids[0] == 5 else {"beta": 1.0})
# the first decision gives beta, every re-route from the second token on gives alpha
SWITCH_AT_TWO = Routes(lambda s: {"beta": 1.0} if len(s.generated) < 2 else {"alpha": 1.0})


def _blocked(weights) -> tuple[threading.Event, threading.Event]:
    """Make `weights`' disk read wait until the returned `release` is set; `reading` is set once
    the read has started (on the loader's thread)."""
    release, reading = threading.Event(), threading.Event()
    real = weights.loader
    assert real is not None and weights.tensors is None  # indexed only: the factors are on disk

    def blocked():
        reading.set()
        assert release.wait(30), "the test never released the read"
        return real()

    weights.loader = blocked
    return release, reading


def _setup(store, tiny_model_dir):
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64)
    registry = AdapterRegistry()
    registry.register_many([(index_adapter(n, store / n, spec, store), False) for n in ("alpha", "beta")])
    engine = Engine(resident, registry, EngineConfig(max_loras=4, decode_step="eager"), gate_source=BY_PROMPT)
    return registry, engine


def _row(registry: AdapterRegistry, name: str, events: dict) -> Sequence:
    seq = Sequence(prompt_ids=list(PROMPTS[name]), max_tokens=MAX_TOKENS, sampling=SamplingParams(temperature=0.0),
                   routing=RoutingSpec("auto", router="centroid"), decode=lambda ids: "x" * len(ids),
                   emit=lambda ev: events.setdefault(seq.id, []).append(ev))
    seq.versions = {v.name: v for v in registry.acquire(["alpha", "beta"])}
    return seq


def _tokens(events: list) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def _steps(engine: Engine, until, limit: int = 500) -> None:
    for i in range(limit):
        if until():
            return
        engine.step()
        if i >= 50:  # the reader thread needs the CPU too: on a loaded machine 500 bare steps were not enough
            time.sleep(0.002)
    raise AssertionError("the engine did not get there")


def test_blocked_read_does_not_stall_other_rows(store, tiny_model_dir, one_torch_thread):
    # reference: each row alone, nothing blocked
    registry, engine = _setup(store, tiny_model_dir)
    ref: dict = {}
    rows = [_row(registry, n, ref) for n in ("alpha", "beta")]
    for seq in rows:
        engine.submit(seq)
    _steps(engine, lambda: not engine.has_work())
    expected = {name: _tokens(ref[seq.id]) for name, seq in zip(("alpha", "beta"), rows, strict=True)}
    assert all(len(t) == MAX_TOKENS for t in expected.values())

    registry, engine = _setup(store, tiny_model_dir)
    release, reading = _blocked(registry.get("alpha").weights)
    events: dict = {}
    slow, fast = _row(registry, "alpha", events), _row(registry, "beta", events)
    engine.submit(slow)
    engine.submit(fast)
    try:
        # beta streams to the end while alpha's read is blocked on its side thread
        _steps(engine, lambda: fast.finish_reason is not None)
        assert reading.is_set() and not release.is_set()
        assert _tokens(events[fast.id]) == expected["beta"] and events[fast.id][-1].finish_reason == "length"
        assert slow.id not in events and slow in engine.parked and engine.queue_depth() == 1
        assert engine.loader.started == 2  # alpha's read (blocked) and beta's (done)
    finally:
        release.set()
    _steps(engine, lambda: not engine.has_work())
    assert _tokens(events[slow.id]) == expected["alpha"]  # the wait changed nothing in its output
    assert registry.get("alpha").refcount == registry.get("beta").refcount == 0


def test_failed_read_ends_that_row_alone(store, tiny_model_dir, one_torch_thread):
    registry, engine = _setup(store, tiny_model_dir)

    def full():
        raise Unavailable("host memory for adapters is full")

    registry.get("alpha").weights.loader = full
    events: dict = {}
    bad, good = _row(registry, "alpha", events), _row(registry, "beta", events)
    engine.submit(bad)
    engine.submit(good)
    _steps(engine, lambda: not engine.has_work())
    assert isinstance(events[bad.id][-1].error, Unavailable) and bad.finish_reason == "error"
    assert len(_tokens(events[good.id])) == MAX_TOKENS and good.finish_reason == "length"
    assert not engine.parked and not engine.loader.pending()


def test_reroute_to_unread_adapter_keeps_mixture_until_read(store, tiny_model_dir, one_torch_thread):
    registry, engine = _setup(store, tiny_model_dir)
    engine.route_step.source = SWITCH_AT_TWO
    release, reading = _blocked(registry.get("alpha").weights)
    events: dict = {}
    seq = _row(registry, "beta", events)
    seq.max_tokens = 12
    seq.routing = RoutingSpec("auto", router="centroid", reroute_every=2)
    engine.submit(seq)
    try:
        _steps(engine, reading.is_set)
        at = len(seq.generated)
        _steps(engine, lambda: len(seq.generated) >= at + 3)  # it keeps streaming while alpha is read
        assert seq.route.pending == {"alpha": 1.0} and seq.route.gates == {"beta": 1.0}
        assert all(e.weights == {"beta": 1.0} for e in events[seq.id])
    finally:
        release.set()
    _steps(engine, lambda: not engine.has_work())
    assert seq.finish_reason == "length" and seq.route.pending is None
    assert events[seq.id][-2].weights == {"alpha": 1.0}  # the decision took effect once read
