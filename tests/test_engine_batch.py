"""The engine's batch type and the scoped LoRA context.

`Batch` owns the running rows and their KV-cache rows: rows stay contiguous as sequences join
and leave, each sequence's cache row follows it when it moves into a hole, and a failed row's
positions are scrubbed when it leaves. `LoRABatchContext.applied` sets gates for one forward
and takes them away on the way out, also when the forward raises."""

from __future__ import annotations

import pytest
import torch

from server.engine.adapter_store import BaseSpec, read_adapter
from server.engine.base_model import load_base_model
from server.engine.engine import Engine, EngineConfig
from server.engine.errors import RowFailed
from server.engine.lora_layer import LoRABatchContext
from server.engine.registry import AdapterRegistry
from server.engine.sampling import SamplingParams
from server.engine.sequence import RoutingSpec, Sequence


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
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    registry = AdapterRegistry()
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64)
    for name in ("alpha", "beta"):
        registry.register(read_adapter(name, store / name, spec))
    return Engine(resident, registry, EngineConfig(max_loras=4))


def _seq(engine: Engine, prompt: list[int], weights: dict[str, float], max_tokens: int = 8) -> Sequence:
    seq = Sequence(prompt_ids=list(prompt), max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0),
                   routing=RoutingSpec("fixed", weights), decode=lambda ids: "x" * len(ids), emit=lambda ev: None)
    seq.versions = {v.name: v for v in engine.registry.acquire(list(weights))}
    return seq


def test_engine_forward_that_raises_leaves_no_gates_behind(engine, monkeypatch) -> None:
    """The gates of a forward that fails are gone after it: the next caller (another step, a
    plain base-model call on the engine thread) never runs with a failed row's adapters."""
    seen: list[bool] = []

    def forward(ids, pos, row, last=None):
        seen.append(engine.ctx.gates is not None)
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine, "_forward", forward)
    events: list = []
    seq = _seq(engine, [5, 17, 42], {"alpha": 1.0})
    seq.emit = events.append
    engine.submit(seq)
    engine.step()
    assert seen == [True]  # the forward ran with the row's gates set
    assert _cleared(engine.ctx)
    assert events[-1].finish_reason == "error" and isinstance(events[-1].error, RowFailed)
    assert engine.registry.get("alpha").refcount == 0
