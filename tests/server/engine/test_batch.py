"""The engine's batch type and the scoped LoRA context.

`Batch` owns the running rows and their KV-cache rows: rows stay contiguous as sequences join
and leave, each sequence's cache row follows it when it moves into a hole, and a failed row's
positions are scrubbed when it leaves. `LoRABatchContext.applied` sets gates for one forward
and takes them away on the way out, also when the forward raises."""

from __future__ import annotations

import pytest
import torch

from server.engine.adapter_weights import BaseSpec
from server.engine.batch import Batch, gate_matrix
from server.engine.errors import RowFailed
from server.engine.kv_cache import KVCache
from server.engine.lora_layer import LoRABatchContext
from server.engine.sampling import SamplingParams
from server.engine.sequence import RoutingSpec, Sequence
from server.store.folder import read_adapter
from tests.server.engine.rows import held_row, tiny_engine


def _cleared(ctx: LoRABatchContext) -> bool:
    return ctx.active == () and ctx.gates is None and ctx.rows is None


def test_applied_context_is_cleared_after_an_exception() -> None:
    ctx = LoRABatchContext()
    gates = torch.ones(2, 1)
    with pytest.raises(RuntimeError, match="kernel"):
        with ctx.applied((3,), gates, None):
            assert ctx.active == (3,) and ctx.gates is gates
            raise RuntimeError("simulated kernel failure")
    assert _cleared(ctx)


def test_applied_context_nests_and_restores() -> None:
    ctx = LoRABatchContext()
    outer, inner, rows = torch.ones(2, 1), torch.full((1, 2), 0.5), torch.tensor([1])
    with ctx.applied((0,), outer, rows):
        with ctx.applied():  # the base model alone, e.g. the router's ungated pass
            assert _cleared(ctx)
        assert ctx.active == (0,) and ctx.gates is outer and ctx.rows is rows
        with ctx.applied((1, 2), inner, None):
            assert ctx.active == (1, 2) and ctx.gates is inner and ctx.rows is None
        assert ctx.gates is outer
    assert _cleared(ctx)


@pytest.fixture()
def engine(store, tiny_model_dir, one_torch_thread):
    return tiny_engine(store, tiny_model_dir)


def test_engine_forward_that_raises_leaves_no_gates_behind(engine, monkeypatch) -> None:
    """The gates of a forward that fails are gone after it: the next caller (another step, a
    plain base-model call on the engine thread) never runs with a failed row's adapters."""
    seen: list[bool] = []

    def forward(ids, pos, row, last=None):
        seen.append(engine.ctx.gates is not None)
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine, "_forward", forward)
    events: list = []
    seq = held_row(engine, [5, 17, 42], {"alpha": 1.0})
    seq.emit = events.append
    engine.submit(seq)
    engine.step()
    assert seen == [True]  # the forward ran with the row's gates set
    assert _cleared(engine.ctx)
    assert events[-1].finish_reason == "error" and isinstance(events[-1].error, RowFailed)
    assert engine.registry.get("alpha").refcount == 0


# -- Batch: rows, cache rows, leaving ----------------------------------------------------------------
def _row(prompt_len: int, generated: int) -> Sequence:
    seq = Sequence(prompt_ids=list(range(1, prompt_len + 1)), max_tokens=16, sampling=SamplingParams(temperature=0.0),
                   routing=RoutingSpec("fixed", {}), decode=lambda ids: "", emit=lambda ev: None)
    seq.generated = list(range(generated))
    return seq


def _filled(prompt_lens: list[int]) -> tuple[Batch, list[Sequence]]:
    """A batch whose row i holds the value i+1 at every position its sequence has in the cache."""
    cache = KVCache(n_layer=2, n_head=2, head_dim=4, max_positions=64, dtype=torch.float32, device=torch.device("cpu"))
    batch = Batch(cache, torch.device("cpu"))
    seqs = [_row(n, 2) for n in prompt_lens]
    first = batch.reserve(seqs, 64)
    assert first == 0 and cache.capacity[0] >= len(seqs)
    for row, seq in enumerate(seqs):
        for k, v in zip(cache.keys, cache.values, strict=True):
            k[row, :, : seq.position] = row + 1
            v[row, :, : seq.position] = -(row + 1)
    batch.add(seqs)
    return batch, seqs


def _holds(batch: Batch, seq: Sequence, value: float) -> bool:
    row = batch.row_of(seq)
    return all(bool((k[row, :, : seq.position] == value).all()) and bool((v[row, :, : seq.position] == -value).all())
               for k, v in zip(batch.cache.keys, batch.cache.values, strict=True))


@torch.inference_mode()  # the engine's cache tensors are inference tensors
def test_batch_add_appends_rows_after_the_running_ones() -> None:
    batch, seqs = _filled([3, 5])
    more = [_row(4, 1), _row(2, 1)]  # running rows have sampled their first token
    assert batch.reserve(more, 64) == 2  # their prefill writes rows 2 and 3
    batch.add(more)
    assert batch.seqs == [*seqs, *more] and len(batch) == 4
    assert all(s in batch for s in more) and _row(1, 0) not in batch
    ids, pos = batch.decode_inputs()
    assert ids.shape == pos.shape == (4, 1)
    assert pos[:, 0].tolist() == [s.position for s in batch]


@torch.inference_mode()  # the engine's cache tensors are inference tensors
def test_batch_remove_keeps_rows_contiguous_and_cache_rows_follow_their_sequence() -> None:
    batch, seqs = _filled([3, 5, 7, 4])
    batch.remove(seqs[1])  # a hole in the middle: the last row moves into it
    assert batch.seqs == [seqs[0], seqs[3], seqs[2]]
    assert _holds(batch, seqs[0], 1) and _holds(batch, seqs[3], 4) and _holds(batch, seqs[2], 3)
    batch.remove(seqs[2])  # the last row: nothing moves
    assert batch.seqs == [seqs[0], seqs[3]]
    assert _holds(batch, seqs[0], 1) and _holds(batch, seqs[3], 4)
    batch.remove(seqs[0])
    assert batch.seqs == [seqs[3]] and batch.row_of(seqs[3]) == 0 and _holds(batch, seqs[3], 4)
    with pytest.raises(ValueError):
        batch.row_of(seqs[0])


@torch.inference_mode()  # the engine's cache tensors are inference tensors
def test_batch_scrubs_the_positions_a_failed_row_leaves() -> None:
    batch, seqs = _filled([3, 9, 4])
    failed = seqs[1]  # row 1, 10 positions; the last row (5 positions) moves into it
    for k in batch.cache.keys:
        k[1, :, : failed.position] = float("nan")
    batch.remove(failed, scrub=True)
    moved = seqs[2]
    assert batch.row_of(moved) == 1 and _holds(batch, moved, 3)
    for k, v in zip(batch.cache.keys, batch.cache.values, strict=True):
        assert bool((k[1, :, moved.position:] == 0).all()) and bool((v[1, :, moved.position:] == 0).all())
        assert not bool(k.isnan().any())
    last = seqs[2]  # a failed last row: its whole row is zeroed
    batch.remove(last, scrub=True)
    assert all(bool((k[1] == 0).all()) for k in batch.cache.keys)
    assert _holds(batch, seqs[0], 1)


@torch.inference_mode()  # the engine's cache tensors are inference tensors
def test_batch_without_scrub_leaves_stale_positions() -> None:
    """What `scrub` is for: a healthy row leaving keeps the cheap path (nothing zeroed)."""
    batch, seqs = _filled([3, 9, 4])
    batch.remove(seqs[1])
    assert bool((batch.cache.keys[0][1, :, seqs[2].position: seqs[1].position] == 2).all())


# -- the gate matrix -----------------------------------------------------------------------------------
def test_gate_matrix_columns_are_adapter_versions(engine, store) -> None:
    """Two versions of one name (a hot swap mid-flight) get two columns and two slots; rows with
    no gate are left out of `rows`; a gate that does not fit the dtype is the row's error."""
    old = engine.registry.get("alpha")
    a = held_row(engine, [1, 2], {"alpha": 1.0})  # holds the first version
    spec = BaseSpec(engine.resident.module_shapes, engine.resident.fingerprint, 64)
    new, _ = engine.registry.register(read_adapter("alpha", store / "beta", spec))
    b = held_row(engine, [1, 2], {"alpha": 0.25, "beta": 0.75})  # the new version
    base = held_row(engine, [1, 2], {})
    for s in (a, b, base):
        s.route.gates = dict(s.routing.weights)
    active, gates, rows = gate_matrix([a, base, b], engine.slots, torch.float32, torch.device("cpu"))
    assert gates is not None and gates.shape == (3, 3) and len(set(active)) == 3
    slot_of = {engine.slots.slot_version[s].version: i for i, s in enumerate(active)}
    assert gates[0, slot_of[old.version]] == 1.0 and gates[2, slot_of[new.version]] == 0.25
    assert gates[1].abs().sum() == 0 and rows is not None and rows.tolist() == [0, 2]
    assert gate_matrix([base], engine.slots, torch.float32, torch.device("cpu")) == ((), None, None)
    b.route.gates = {"alpha": float("nan")}
    with pytest.raises(ValueError, match="not finite"):
        gate_matrix([a, b], engine.slots, torch.float32, torch.device("cpu"))
    for s in (a, b, base):
        s.release_references(engine.registry)


def test_gate_matrix_active_set_does_not_depend_on_row_order(engine) -> None:
    """The same adapters in any row order are one active set (columns in slot order), so rows
    joining, leaving or moving do not make the layers concatenate a new factor stack."""
    a = held_row(engine, [1, 2], {"alpha": 1.0})
    b = held_row(engine, [1, 2], {"beta": 1.0})
    for s in (a, b):
        s.route.gates = dict(s.routing.weights)
    first, g1, _ = gate_matrix([a, b], engine.slots, torch.float32, torch.device("cpu"))
    second, g2, _ = gate_matrix([b, a], engine.slots, torch.float32, torch.device("cpu"))
    assert first == second and list(first) == sorted(first)
    assert g1 is not None and g2 is not None and torch.equal(g1, g2.flip(0))
    for s in (a, b):
        s.release_references(engine.registry)
