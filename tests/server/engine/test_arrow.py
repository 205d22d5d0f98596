"""Arrow (arXiv 2405.11157) in the batched LoRA layer against PEFT's `create_arrow_model`: the
prototypes, the logits of a prompt, greedy decoding, and an Arrow row batched beside rows with
fixed adapters and manual mixtures without changing them."""

from __future__ import annotations

import pytest
import torch
from peft import ArrowConfig, create_arrow_model
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from router_core.arrow import prototype, token_gates
from server.engine.adapter_weights import BaseSpec
from server.engine.sequence import RoutingSpec
from server.store.folder import read_adapter
from tests.server.engine.rows import PROMPT, hold, row, tiny_engine, token_ids
from tests.tiny import make_adapter, run_engine

NAMES = ("e0", "e1", "e2")
TARGETS = ("c_attn", "c_proj", "c_fc")


@pytest.fixture()
def experts(store, tiny_model_dir):
    """Three experts PEFT's Arrow accepts (same rank and targets), strong enough to move greedy
    tokens. Each has one dominant rank direction, as trained LoRAs do: PEFT finds the top
    singular vector by 15 power iterations, which converge only when σ1 clearly leads σ2 (on
    plain random factors its vectors are 0.99 from the exact ones, ours)."""
    for i, name in enumerate(NAMES):
        folder = make_adapter(tiny_model_dir, store / name, seed=10 + i, rank=4, alpha=8, targets=TARGETS,
                              scale_b=3.0)
        path = folder / "adapter_model.safetensors"
        tensors = load_file(path)
        for key, t in tensors.items():
            if "lora_A" in key:
                t[0] *= 3.0  # [r, in]: the first rank term of ΔW = B A grows 3x
        save_file(tensors, path)
    return store


def peft_arrow(store, model_dir, top_k: int, temperature: float):
    base = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    cfg = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    return create_arrow_model(base, [str(store / n) for n in NAMES], cfg).eval()


def arrow_row(prompt, top_k: int, temperature: float, max_tokens: int = 10):
    seq = row(prompt, {n: 1.0 / len(NAMES) for n in NAMES}, max_tokens)
    seq.routing = RoutingSpec("fixed", dict(seq.routing.weights), per_token=(top_k, temperature))
    return seq


def test_prototype_is_the_top_right_singular_vector_of_delta_w():
    torch.manual_seed(0)
    a, b = torch.randn(16, 3), torch.randn(3, 10)
    u = torch.linalg.svd(a @ b).U[:, 0]  # our x a b is PEFT's (B A)ᵀ: its right vector is our left one
    assert torch.allclose(prototype(a, b).abs(), u.abs(), atol=1e-5)


def test_token_gates_follow_peft_top_k_and_temperature():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # one row, two tokens
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    g = token_gates(x, protos, torch.ones(1, 3, dtype=torch.bool), torch.tensor([2]), torch.tensor([0.5]))
    # token 0: scores 1, 0, 0.6 -> keep 1 and 0.6 -> softmax([2, 1.2])
    want0 = torch.softmax(torch.tensor([2.0, 1.2]), 0)
    assert torch.allclose(g[0, 0], torch.tensor([want0[0], 0.0, want0[1]]))
    assert g[0, 1, 0] == 0 and torch.allclose(g[0, 1].sum(), torch.tensor(1.0))
    none = token_gates(x, protos, torch.zeros(1, 3, dtype=torch.bool), torch.tensor([2]), torch.tensor([1.0]))
    assert torch.equal(none, torch.zeros_like(none))  # no candidate: the base model, not NaN


@pytest.mark.parametrize("top_k,temperature", [(2, 1.0), (3, 0.5)])
def test_arrow_matches_peft_create_arrow_model(experts, tiny_model_dir, top_k, temperature):
    engine = tiny_engine(experts, tiny_model_dir, NAMES)
    ref = peft_arrow(experts, tiny_model_dir, top_k, temperature)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([PROMPT])).logits[0, -1]
        ref_tokens = ref.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False,
                                  pad_token_id=0)[0, len(PROMPT):].tolist()
    # registering computed no prototype: the first Arrow step over the adapters does
    assert all(engine.registry.get(n).prototypes is None for n in NAMES)
    seq = hold(engine, arrow_row(PROMPT, top_k, temperature))
    captured = {}
    orig = engine._forward

    def spy(ids, pos, r, last=None):
        logits, hidden = orig(ids, pos, r, last)
        captured.setdefault("prefill", logits[0].clone())
        return logits, hidden

    engine._forward = spy  # type: ignore[method-assign]
    events = run_engine(engine, [seq])[seq.id]
    assert (captured["prefill"] - ref_logits).abs().max().item() <= 1e-4
    assert token_ids(events) == ref_tokens
    # the prototypes PEFT built by power iteration are ours (up to sign), and the layers route by them
    path = "transformer.h.0.attn.c_attn"
    layer = next(m for n, m in ref.named_modules() if n.endswith("h.0.attn.c_attn"))
    peft_protos = layer.lora_arrow["arrow_router"].prototypes
    ours = torch.stack([engine.registry.get(n).prototypes[path] for n in NAMES])
    assert (peft_protos * ours).sum(-1).abs().min() > 0.99999
    held = engine.slots.layers[path].protos
    for n in NAMES:
        version = engine.registry.get(n)
        assert torch.equal(held[engine.slots.slot_of(version)], version.prototypes[path])
    # and Arrow did route: a plain uniform mixture of the same experts decodes otherwise
    uniform = hold(engine, row(PROMPT, {n: 1.0 / len(NAMES) for n in NAMES}, 10))
    assert token_ids(run_engine(engine, [uniform])[uniform.id]) != ref_tokens
    # the trace: mean weight per adapter over layers, summing to 1 per stretch
    segs = seq.segments()
    assert segs and all(abs(sum(s["weights"].values()) - 1) < 1e-3 for s in segs)


def test_prototypes_once_per_version_on_the_first_arrow_step(experts, tiny_model_dir, monkeypatch):
    """Registering and serving rows with row gates compute no prototype; the first Arrow step
    computes each version's once, and a later install of the same version (after its slot was
    given away) reuses them; a new version of a name gets its own."""
    from server.engine import slots as slots_module

    calls: list[int] = []
    real = slots_module.prototypes

    def counted(factors):
        calls.append(len(factors))
        return real(factors)

    monkeypatch.setattr(slots_module, "prototypes", counted)
    engine = tiny_engine(experts, tiny_model_dir, NAMES)
    fixed = hold(engine, row(PROMPT, {"e0": 0.5, "e1": 0.5}, 3))
    run_engine(engine, [fixed])
    assert calls == [] and all(engine.registry.get(n).prototypes is None for n in NAMES)

    first = hold(engine, arrow_row(PROMPT, 2, 1.0, 6))
    want = token_ids(run_engine(engine, [first])[first.id])
    assert len(calls) == len(NAMES)
    for slot in range(engine.slots.num_slots):  # give every slot away: the next step installs again
        engine.slots.evict(slot)
    again = hold(engine, arrow_row(PROMPT, 2, 1.0, 6))
    assert token_ids(run_engine(engine, [again])[again.id]) == want
    assert len(calls) == len(NAMES)  # reused, not recomputed

    folder = experts / "e1"
    spec = BaseSpec(engine.resident.module_shapes, engine.resident.fingerprint, 64)
    engine.registry.register(read_adapter("e1", folder, spec))  # a new version of e1
    third = hold(engine, arrow_row(PROMPT, 2, 1.0, 6))
    assert token_ids(run_engine(engine, [third])[third.id]) == want  # same factors, same tokens
    assert len(calls) == len(NAMES) + 1 and engine.registry.get("e1").prototypes is not None


def test_arrow_row_beside_fixed_and_mixture_rows_changes_nobody(experts, tiny_model_dir):
    engine = tiny_engine(experts, tiny_model_dir, (*NAMES, "alpha"))

    def make():
        return [hold(engine, arrow_row(PROMPT, 2, 1.0, 6)),
                hold(engine, row(PROMPT[:5], {"e1": 1.0}, 4)),
                hold(engine, row(PROMPT[2:], {"alpha": 0.3, "e0": 0.7}, 6)),
                hold(engine, arrow_row(PROMPT[3:], 1, 0.7, 5))]

    alone = []
    for seq in make():
        alone.append(token_ids(run_engine(engine, [seq])[seq.id]))
    batch = make()
    together = run_engine(engine, batch)
    assert [token_ids(together[s.id]) for s in batch] == alone


def test_arrow_rows_take_the_eager_step_beside_the_static_one(experts, tiny_model_dir):
    eager = tiny_engine(experts, tiny_model_dir, NAMES)
    static = tiny_engine(experts, tiny_model_dir, NAMES, decode_step="static")
    got = []
    for engine in (eager, static):
        seqs = [hold(engine, arrow_row(PROMPT, 2, 1.0, 8)), hold(engine, row(PROMPT, {"e2": 1.0}, 8))]
        ev = run_engine(engine, seqs)
        got.append([token_ids(ev[s.id]) for s in seqs])
    assert got[0] == got[1]


def test_trace_reports_each_stretch_mean_of_the_layer_weights():
    from server.engine.route_state import RouteState

    state = RouteState(gates={"a": 0.5, "b": 0.5})
    assert state.in_force(0, 2) == (0, {"a": 0.5, "b": 0.5})  # row gates: recorded as they are
    per_token = [{"a": 0.8, "b": 0.2}, {"a": 0.4, "b": 0.6}, {"a": 1.0}]
    got = []
    for i, w in enumerate(per_token):
        state.layer_weights = w
        start, weights = state.in_force(i, 2)
        state.trace.record(start, weights)
        got.append((start, weights))
    assert got[1][0] == 0 and got[1][1] == pytest.approx({"a": 0.6, "b": 0.4})  # mean of tokens 0 and 1
    assert got[2] == (2, {"a": 1.0})  # a new stretch
    assert state.trace.segments(end_token=3) == [
        {"start_token": 0, "end_token": 2, "weights": {"a": 0.6, "b": 0.4}, "confidence": 0.6},
        {"start_token": 2, "end_token": 3, "weights": {"a": 1.0}, "confidence": 1.0}]
