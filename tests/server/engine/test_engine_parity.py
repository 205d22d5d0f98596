"""The engine's numerics against PEFT: one adapter, weighted mixtures (cat merge), mixed batches."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import GPT2LMHeadModel

from server.engine import gpt2
from server.engine.adapter_weights import BaseSpec
from server.engine.base_model import load_base_model
from server.engine.engine import Engine, EngineConfig
from server.engine.registry import AdapterRegistry
from server.store.folder import read_adapter
from tests.server.engine.rows import PROMPT, alone_and_batched, hold, row, token_ids
from tests.tiny import make_adapter, run_engine


@pytest.fixture()
def engine(store, tiny_model_dir, tmp_path):
    make_adapter(tiny_model_dir, store / "gamma", seed=3, rank=2, alpha=2, targets=("c_attn", "c_proj", "c_fc"),
                 use_rslora=True)
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    registry = AdapterRegistry()
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64)
    for name in ("alpha", "beta", "gamma"):
        registry.register(read_adapter(name, store / name, spec))
    return Engine(resident, registry, EngineConfig(max_loras=4))


@pytest.fixture()
def peft_model(store, tiny_model_dir):
    base = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    model = PeftModel.from_pretrained(base, store / "alpha", adapter_name="alpha")
    model.load_adapter(store / "beta", adapter_name="beta")
    model.load_adapter(store / "gamma", adapter_name="gamma")
    return model.eval()


def engine_logits(engine: Engine, weights: dict[str, float]) -> torch.Tensor:
    versions = [engine.registry.get(n) for n in weights]
    engine.ctx.set(tuple(engine.slots.ensure(versions)), torch.tensor([list(weights.values())]), None)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        logits, _ = gpt2.forward(engine.resident.model, ids, torch.arange(len(PROMPT))[None], engine.cache, all_logits=True)
    engine.ctx.clear()
    return logits


@pytest.mark.parametrize("name", ["alpha", "beta", "gamma"])
def test_single_adapter_matches_peft(engine, peft_model, name):
    peft_model.set_adapter(name)
    with torch.no_grad():
        ref = peft_model(torch.tensor([PROMPT])).logits
    got = engine_logits(engine, {name: 1.0})
    assert (got - ref).abs().max().item() <= 1e-4


def test_adapter_changes_logits(engine, peft_model):
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(torch.tensor([PROMPT])).logits
    assert (engine_logits(engine, {}) - base).abs().max().item() <= 1e-4
    assert (engine_logits(engine, {"alpha": 1.0}) - base).abs().max().item() > 1e-2  # the check can fail


@pytest.mark.parametrize("weights", [{"alpha": 0.5, "beta": 0.5}, {"alpha": 0.2, "beta": 0.3, "gamma": 0.5},
                                     {"beta": 0.9, "gamma": 0.1}])
def test_mixture_matches_peft_cat_merge(engine, peft_model, weights):
    peft_model.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    with torch.no_grad():
        ref = peft_model(torch.tensor([PROMPT])).logits
    assert (engine_logits(engine, weights) - ref).abs().max().item() <= 1e-4


def test_mixed_batch_rows_equal_rows_run_alone(engine):
    # Rows of different lengths that finish at different steps, so rows leave the batch (and the
    # last row is moved into the hole) while others are still decoding.
    specs = [
        (PROMPT, {"alpha": 1.0}, 12),
        (PROMPT[:4], {"beta": 1.0}, 3),
        ([7, 7, 7, 7, 7, 7, 7], {}, 9),  # base row: zero gates
        (PROMPT[2:], {"alpha": 0.3, "gamma": 0.7}, 5),
        ([1, 2, 3], {"alpha": 0.5, "beta": 0.5}, 14),
    ]
    alone, alone_lp, together, together_lp = alone_and_batched(engine, specs)
    assert together == alone
    assert [len(t) for t in alone] == [n for _, _, n in specs]
    for got, ref in zip(together_lp, alone_lp, strict=True):  # the chosen tokens' log-probs, not just the argmax
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert len({tuple(t) for t in alone}) > 1  # different adapters really generate differently


def test_greedy_engine_matches_peft_generate(engine, peft_model):
    peft_model.set_adapter("beta")
    with torch.no_grad():
        ref = peft_model.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False,
                                  pad_token_id=0)[0, len(PROMPT):].tolist()
    seq = hold(engine, row(PROMPT, {"beta": 1.0}, max_tokens=10))
    assert token_ids(run_engine(engine, [seq])[seq.id]) == ref


def test_seeded_sampling_is_reproducible(engine):
    a = hold(engine, row(PROMPT, {"alpha": 1.0}, temperature=0.9, top_p=0.9, top_k=50, seed=7))
    b = hold(engine, row(PROMPT, {"alpha": 1.0}, temperature=0.9, top_p=0.9, top_k=50, seed=7))
    c = hold(engine, row(PROMPT, {"alpha": 1.0}, temperature=0.9, top_p=0.9, top_k=50, seed=8))
    ev = run_engine(engine, [a, b, c])
    assert token_ids(ev[a.id]) == token_ids(ev[b.id])
    assert token_ids(ev[a.id]) != token_ids(ev[c.id])


def test_slots_evict_lru_and_release_references(store, tiny_model_dir):
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    registry = AdapterRegistry()
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64)
    make_adapter(tiny_model_dir, store / "gamma", seed=3)
    for name in ("alpha", "beta", "gamma"):
        registry.register(read_adapter(name, store / name, spec))
    small = Engine(resident, registry, EngineConfig(max_loras=2))
    outputs = {}
    for name in ("alpha", "beta", "gamma", "alpha"):
        seq = hold(small, row(PROMPT, {name: 1.0}, max_tokens=4))
        outputs.setdefault(name, []).append(token_ids(run_engine(small, [seq])[seq.id]))
    resident_names = {v.name for v in small.slots.resident()}
    assert resident_names == {"gamma", "alpha"}  # beta was least recently used when alpha came back
    assert small.slots.loads == 4  # alpha was evicted by gamma and re-installed
    assert outputs["alpha"][0] == outputs["alpha"][1]  # re-installed weights are the same weights
    assert all(v.refcount == 0 for v in registry.snapshot().values())


def test_shutdown_outside_inference_mode_cancels_rows(engine):
    """The graceful-shutdown deadline cancels rows from outside `step()`: compacting rows must not
    trip over cache tensors made in inference mode (they grow inside `step()`)."""
    seqs = [hold(engine, row(PROMPT[: 3 + i], {"alpha": 1.0}, max_tokens=100)) for i in range(3)]  # cache grows
    events: dict[int, list] = {s.id: [] for s in seqs}
    for s in seqs:
        s.emit = events[s.id].append
        engine.submit(s)
    engine.step()
    assert len(engine.running) == 3
    engine.shutdown()
    assert engine.running == [] and not engine.has_work()
    assert all(events[s.id][-1].finish_reason == "cancelled" for s in seqs)
    assert all(v.refcount == 0 for v in engine.registry.snapshot().values())


def test_engine_failure_reports_an_error_to_every_request(engine):
    """If a step fails (a bug), the worker cancels the batch with reason "error": every waiting
    client gets a terminal event carrying an error instead of waiting for its timeout."""
    seqs = [hold(engine, row(PROMPT, {"beta": 1.0}, max_tokens=20)) for _ in range(2)]
    events: dict[int, list] = {s.id: [] for s in seqs}
    for s in seqs:
        s.emit = events[s.id].append
        engine.submit(s)
    engine.step()
    late = hold(engine, row(PROMPT, {"alpha": 1.0}))
    events[late.id] = []
    late.emit = events[late.id].append
    engine.submit(late)
    engine.shutdown("error")
    for s in [*seqs, late]:
        last = events[s.id][-1]
        assert last.finish_reason == "error" and last.error is not None and last.error.status_code == 503
    assert all(v.refcount == 0 for v in engine.registry.snapshot().values())
