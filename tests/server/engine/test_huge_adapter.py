"""An adapter whose factors are finite but whose product with the activations overflows the
serving dtype (issue 23, item 1; issue 27, finding 12): its non-finite delta must reach only the
rows that gave it weight. Rows that give it weight 0 -- in the same batch, even in the same
forward as rows that use it -- produce exactly the tokens they produce alone.

The registration bound (`server.store.folder`) refuses such adapters at the API; these tests
register one directly, past that bound, to pin the engine's own guarantee: a zero gate never
multiplies an overflowed product (inf x 0 = NaN in IEEE arithmetic)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.engine.adapter_weights import BaseSpec
from server.engine.base_model import load_base_model
from server.engine.engine import Engine, EngineConfig
from server.engine.errors import RowFailed
from server.engine.lora_layer import gated
from server.engine.registry import AdapterRegistry
from server.store.folder import read_adapter
from tests.server.engine.rows import PROMPT, held_row, token_ids
from tests.tiny import run_engine


def _engine(store, model_dir, dtype: str, decode_step: str = "eager") -> Engine:
    resident = load_base_model(str(model_dir), "cpu", dtype)
    registry = AdapterRegistry()
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64, resident.dtype)
    for name in ("alpha", "beta"):
        registry.register(read_adapter(name, store / name, spec))
    alpha = read_adapter("alpha", store / "alpha", spec)
    big = torch.finfo(resident.dtype).max / 2  # every A entry +-big: finite, but x A sums past the largest value
    huge = dataclasses.replace(alpha, name="huge", tensors={m: (a.sign() * big, b) for m, (a, b) in alpha.tensors.items()})
    registry.register(huge)
    return Engine(resident, registry, EngineConfig(max_loras=4, decode_step=decode_step))


def _good(engine: Engine):
    return [held_row(engine, PROMPT, {"alpha": 1.0}, max_tokens=6), held_row(engine, PROMPT[:5], {"beta": 1.0}, max_tokens=6),
            held_row(engine, PROMPT[2:], {"alpha": 0.4, "beta": 0.6}, max_tokens=6),
            held_row(engine, PROMPT, {"alpha": 0.5, "huge": 0.0}, max_tokens=6),  # names it with weight 0
            held_row(engine, [7, 7, 7], {}, max_tokens=6)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_overflowing_adapter_fails_only_its_own_rows(store, tiny_model_dir, one_torch_thread, dtype):
    engine = _engine(store, tiny_model_dir, dtype)
    alone = {i: token_ids(evs) for i, evs in enumerate(run_engine(engine, _good(engine)).values())}
    assert all(len(t) == 6 for t in alone.values())
    good = _good(engine)
    bad = [held_row(engine, PROMPT, {"huge": 1.0}, max_tokens=6),
           held_row(engine, PROMPT[1:], {"huge": 0.5, "beta": 0.5}, max_tokens=6)]
    events = run_engine(engine, [good[0], bad[0], good[1], good[2], bad[1], good[3], good[4]])
    assert {i: token_ids(events[s.id]) for i, s in enumerate(good)} == alone
    for s in bad:
        last = events[s.id][-1]
        assert last.finish_reason == "error" and isinstance(last.error, RowFailed), last
    assert all(v.refcount == 0 for v in engine.registry.snapshot().values())


def test_gated_zero_gate_is_exactly_zero():
    h = torch.tensor([[float("inf"), 2.0], [float("nan"), -1.0]], dtype=torch.float16)
    g = torch.tensor([[0.0, 0.5], [0.0, 1.0]], dtype=torch.float16)
    assert gated(h, g, 1).tolist() == [[0.0, 1.0], [0.0, -1.0]]
    h3 = torch.tensor([[float("inf"), 1.0], [3.0, 1.0]])  # one row, T = 2
    assert gated(h3, torch.tensor([[0.0, 2.0]]), 2).tolist() == [[0.0, 2.0], [0.0, 2.0]]
    assert torch.isinf(gated(h3, torch.tensor([[1.0, 1.0]]), 2)[0, 0])  # a weighted overflow stays visible


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_registration_refuses_factors_that_overflow_the_serving_dtype(store, tiny_model_dir, tmp_path, dtype):
    """The issue's reproduction: a copy of an adapter with every lora_A entry rescaled to a
    finite but huge value is refused at registration with a message naming the bound; the
    adapter as trained is accepted in every dtype."""
    import shutil

    from safetensors.torch import load_file, save_file

    from server.engine.errors import InvalidAdapter
    from server.store.folder import factor_budget

    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64, dtype)
    assert read_adapter("alpha", store / "alpha", spec).rank == 4
    huge = tmp_path / "huge"
    shutil.copytree(store / "alpha", huge)
    tensors = load_file(huge / "adapter_model.safetensors")
    # just inside the entry-wise check, far outside the norm budget
    entry = min(torch.finfo(dtype).max / 8, 1e38)
    save_file({k: (v.sign() * entry if "lora_A" in k else v) for k, v in tensors.items()}, huge / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapter, match="overflow .* for ordinary activations") as err:
        read_adapter("huge", huge, spec)
    assert f"{factor_budget(dtype):.3g}" in err.value.message


def test_overflowing_adapter_fails_only_its_own_rows_in_the_static_step(store, tiny_model_dir, one_torch_thread):
    """The same guarantee in the fixed-shape decode step (`static_step`, what `--compile auto`
    runs on CUDA, there as CUDA graphs), in fp16: a row is re-gated onto the overflowing adapter
    after its prefill (as a re-route does), so the decode step holds it among the active
    adapters while the other rows give it weight 0; they decode what they decode alone."""
    static = _engine(store, tiny_model_dir, "float16", decode_step="static")
    static.warm_up()
    alone = {i: token_ids(evs) for i, evs in enumerate(run_engine(static, _good(static)).values())}
    assert all(len(t) == 6 for t in alone.values())
    good = _good(static)
    switcher = held_row(static, PROMPT[1:], {"beta": 1.0}, max_tokens=6)
    events: dict[int, list] = {}
    for seq in [good[0], switcher, *good[1:]]:
        events[seq.id] = []
        seq.emit = events[seq.id].append
        static.submit(seq)
    static.step()  # prefill and the first decode step, on beta
    switcher.versions["huge"] = static.registry.acquire(["huge"])[0]
    switcher.route.gates = {"huge": 1.0}
    calls = static.static.calls if static.static is not None else 0
    while static.has_work():
        static.step()
    assert static.static is not None and static.static.calls > calls
    assert {i: token_ids(events[s.id]) for i, s in enumerate(good)} == alone
    last = events[switcher.id][-1]
    assert last.finish_reason == "error" and isinstance(last.error, RowFailed), last
    assert all(v.refcount == 0 for v in static.registry.snapshot().values())
