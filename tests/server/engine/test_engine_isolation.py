"""Row-level fault isolation inside the engine: a row that fails (sampling, gates, stop strings,
detokenising, the forward) fails alone with a clear error; the other rows of the same batch
produce exactly what they produce without it, and every adapter reference is released.

The hostile values here bypass the API's edge checks on purpose: these tests pin the engine's
own guarantee, whatever reaches it."""

from __future__ import annotations

import pytest

from server.engine.adapter_weights import BaseSpec
from server.engine.base_model import load_base_model
from server.engine.engine import Engine
from server.engine.errors import RequestTimeout, RowFailed
from server.engine.sequence import Sequence
from server.store.folder import read_adapter
from tests.server.engine.rows import PROMPT, held_row, tiny_engine, token_ids
from tests.tiny import run_engine


@pytest.fixture()
def engine(store, tiny_model_dir, one_torch_thread):
    return tiny_engine(store, tiny_model_dir)


def _good(engine: Engine) -> list[Sequence]:
    """Four healthy rows: greedy and seeded sampling, adapters, a mixture and the base model."""
    return [held_row(engine, PROMPT, {"alpha": 1.0}), held_row(engine, PROMPT[:5], {"beta": 1.0}, temperature=0.8, seed=3),
            held_row(engine, PROMPT[2:], {"alpha": 0.4, "beta": 0.6}, max_tokens=6), held_row(engine, [7, 7, 7], {})]


def _refcounts(engine: Engine) -> dict[str, int]:
    return {n: v.refcount for n, v in engine.registry.snapshot().items()}


def _check_isolated(engine: Engine, bad: Sequence, expected_error: type) -> None:
    alone = run_engine(engine, _good(engine))
    clean = [token_ids(evs) for evs in alone.values()]
    good = _good(engine)
    events = run_engine(engine, [good[0], good[1], bad, good[2], good[3]])
    assert [token_ids(events[s.id]) for s in good] == clean  # the other rows are untouched
    assert all(events[s.id][-1].finish_reason in ("length", "stop") for s in good)
    last = events[bad.id][-1]
    assert last.finish_reason == "error" and isinstance(last.error, expected_error), last
    assert _refcounts(engine) == {"alpha": 0, "beta": 0}
    assert engine.running == [] and not engine.waiting


def test_sampling_failure_fails_its_row_alone(engine):
    # temperature 1e-300 divides the logits into inf: softmax NaN, multinomial raises
    _check_isolated(engine, held_row(engine, PROMPT, {"alpha": 1.0}, temperature=1e-300), RowFailed)


def test_top_p_underflow_fails_its_row_alone(engine):
    # 1e-300 is 0 in float32: every token is dropped, softmax NaN
    _check_isolated(engine, held_row(engine, PROMPT, {}, temperature=1.0, top_p=1e-300, seed=1), RowFailed)


def test_huge_gate_fails_its_row_alone(engine):
    # a gate past the serving dtype breaks the shared gate matrix: the batch is retried row by row
    _check_isolated(engine, held_row(engine, PROMPT, {"alpha": 1e300}), RowFailed)


def test_non_finite_logits_fail_their_row_alone(engine):
    # 1e30 is finite in float32 but the LoRA delta times it is not: NaN/inf logits in that row only
    _check_isolated(engine, held_row(engine, PROMPT, {"alpha": 1e30}), RowFailed)


def test_detokenising_failure_fails_its_row_alone(engine):
    def decode(ids):
        if len(ids) >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "broken tokenizer")
        return "ok"

    _check_isolated(engine, held_row(engine, PROMPT, {"beta": 1.0}, decode=decode), RowFailed)


def test_emit_failure_fails_its_row_alone(engine):
    bad = held_row(engine, PROMPT, {"alpha": 1.0})
    calls = []

    def emit(ev):  # the client's loop closed under it: every delivery raises
        calls.append(ev)
        raise RuntimeError("Event loop is closed")

    good = _good(engine)
    events = {s.id: [] for s in good}
    for s in good:
        s.emit = events[s.id].append
        engine.submit(s)
    bad.emit = emit
    engine.submit(bad)
    while engine.has_work():
        engine.step()
    assert all(events[s.id][-1].finish_reason in ("length", "stop") for s in good)
    assert calls and calls[-1].finish_reason == "error"
    assert _refcounts(engine) == {"alpha": 0, "beta": 0}


def test_forward_failure_retries_rows_alone(engine, monkeypatch):
    """A shared forward that fails because of one row (here: any forward that includes it, from
    its third token on) is retried row by row; only that row fails, in prefill and in decode."""
    poisoned: list[Sequence] = []
    real = engine._forward

    def forward(ids, pos, row, last=None):
        rows = engine.running[row:row + ids.shape[0]] if last is None else []
        if any(s in rows and len(s.generated) >= 3 for s in poisoned):
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return real(ids, pos, row, last)

    monkeypatch.setattr(engine, "_forward", forward)
    bad = held_row(engine, PROMPT, {"alpha": 1.0})
    poisoned.append(bad)
    _check_isolated(engine, bad, RowFailed)


def test_prefill_failure_retries_rows_alone(engine, monkeypatch):
    real = engine._forward

    def forward(ids, pos, row, last=None):
        if last is not None and (ids == 399).any():  # the prefill of a batch holding the bad prompt
            raise RuntimeError("simulated kernel failure")
        return real(ids, pos, row, last)

    monkeypatch.setattr(engine, "_forward", forward)
    _check_isolated(engine, held_row(engine, [399, 1, 2], {"beta": 1.0}), RowFailed)


def test_deadline_ends_a_row_with_a_timeout(engine):
    late = held_row(engine, PROMPT, {"alpha": 1.0}, max_tokens=50)
    late.deadline = 0.0  # long past
    _check_isolated(engine, late, RequestTimeout)


def test_release_is_exactly_once(engine):
    seq = held_row(engine, PROMPT, {"alpha": 1.0})
    assert engine.registry.get("alpha").refcount == 1
    seq.release_references(engine.registry)
    seq.release_references(engine.registry)
    assert engine.registry.get("alpha").refcount == 0


def test_scaled_weights_must_fit_the_serving_dtype(tiny_model_dir, tmp_path):
    """An adapter whose B·scale is finite in float32 but not in float16 is refused by an fp16
    server (its gates would be inf) and accepted by an fp32 one."""
    import torch

    from server.engine.errors import InvalidAdapter
    from tests.tiny import make_adapter

    folder = make_adapter(tiny_model_dir, tmp_path / "big", seed=4, scale_b=1e6)
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    fp32 = BaseSpec(resident.module_shapes, resident.fingerprint, 64, torch.float32)
    fp16 = BaseSpec(resident.module_shapes, resident.fingerprint, 64, torch.float16)
    assert read_adapter("big", folder, fp32).scale == 2.0
    with pytest.raises(InvalidAdapter, match="overflow"):
        read_adapter("big", folder, fp16)
