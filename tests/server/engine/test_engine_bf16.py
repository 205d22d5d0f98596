"""bf16, the CPU default where the CPU computes it natively (`--dtype auto`): the engine's numerics
against PEFT in bf16, and how often greedy decoding agrees with fp32.

Tolerance: bf16 keeps 8 significant bits, so any bf16 forward differs from the fp32 result by
rounding errors of order 2^-8 of the activations, and two bf16 implementations that order their
operations differently (the engine folds the LoRA scale into B, concatenates the factors of a
mixture and accumulates in fp32 inside oneDNN; PEFT scales after the product) do not agree
bit for bit. What can be demanded is that the engine is no less accurate than PEFT itself: its
distance from the fp32 reference at most twice PEFT-bf16's distance from it.
"""

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
from tests.server.engine.rows import PROMPT, hold, row, token_ids
from tests.tiny import run_engine


def _engine(store, model_dir, dtype: str) -> Engine:
    resident = load_base_model(str(model_dir), "cpu", dtype)
    registry = AdapterRegistry()
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64)
    for name in ("alpha", "beta"):
        registry.register(read_adapter(name, store / name, spec))
    return Engine(resident, registry, EngineConfig(max_loras=4))


def _peft(store, model_dir, dtype: torch.dtype) -> PeftModel:
    base = GPT2LMHeadModel.from_pretrained(model_dir, dtype=dtype).eval()
    model = PeftModel.from_pretrained(base, store / "alpha", adapter_name="alpha")
    model.load_adapter(store / "beta", adapter_name="beta")
    return model.eval()


def _engine_logits(engine: Engine, weights: dict[str, float]) -> torch.Tensor:
    versions = [engine.registry.get(n) for n in weights]
    gates = torch.tensor([list(weights.values())], dtype=engine.resident.dtype)
    engine.ctx.set(tuple(engine.slots.ensure(versions)), gates, None)
    with torch.inference_mode():
        logits, _ = gpt2.forward(engine.resident.model, torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None],
                                 engine.cache, all_logits=True)
    engine.ctx.clear()
    return logits.float()


@pytest.mark.parametrize("weights", [{"alpha": 1.0}, {"beta": 1.0}, {"alpha": 0.3, "beta": 0.7}])
def test_bf16_engine_is_as_accurate_as_peft_bf16(store, tiny_model_dir, weights):
    peft32, peft16 = _peft(store, tiny_model_dir, torch.float32), _peft(store, tiny_model_dir, torch.bfloat16)
    refs = []
    for model in (peft32, peft16):
        if len(weights) > 1:
            model.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type="cat")
        model.set_adapter("mix" if len(weights) > 1 else next(iter(weights)))
        with torch.no_grad():
            refs.append(model(torch.tensor([PROMPT])).logits.float())
    ref32, ref16 = refs
    got = _engine_logits(_engine(store, tiny_model_dir, "bfloat16"), weights)
    peft_err = (ref16 - ref32).abs().max().item()
    engine_err = (got - ref32).abs().max().item()
    assert 0 < peft_err < 0.1  # bf16 really ran, and is close
    assert engine_err <= 2 * peft_err, (engine_err, peft_err)
    with torch.no_grad(), peft32.disable_adapter():
        base = peft32(torch.tensor([PROMPT])).logits.float()
    assert (ref32 - base).abs().max().item() > 10 * engine_err  # the adapter's effect dwarfs the rounding


def test_bf16_greedy_tokens_agree_with_fp32(store, tiny_model_dir):
    """Greedy decoding in bf16 against fp32 on the tiny model: the tokens up to the first
    disagreement are identical, and a disagreement happens only where fp32's top two logits were
    within bf16's rounding of each other (then either choice is a faithful rounding)."""
    e32, e16 = _engine(store, tiny_model_dir, "float32"), _engine(store, tiny_model_dir, "bfloat16")
    prompts = [PROMPT, PROMPT[:4], [7, 7, 7, 7], [1, 2, 3, 4, 5, 6], PROMPT[3:]]
    agree = total = 0
    for prompt in prompts:
        for weights in ({"alpha": 1.0}, {"alpha": 0.5, "beta": 0.5}):
            a = hold(e32, row(prompt, weights, max_tokens=16))
            b = hold(e16, row(prompt, weights, max_tokens=16))
            t32, t16 = token_ids(run_engine(e32, [a])[a.id]), token_ids(run_engine(e16, [b])[b.id])
            same = next((i for i, (x, y) in enumerate(zip(t32, t16, strict=True)) if x != y), len(t32))
            agree, total = agree + same, total + len(t32)
            if same < len(t32):  # the fp32 margin at the first disagreement is within bf16 rounding
                ids = torch.tensor([prompt + t32[:same]])
                versions = [e32.registry.get(n) for n in weights]
                e32.ctx.set(tuple(e32.slots.ensure(versions)), torch.tensor([list(weights.values())]), None)
                with torch.inference_mode():
                    logits, _ = gpt2.forward(e32.resident.model, ids, torch.arange(ids.shape[1])[None], e32.cache)
                e32.ctx.clear()
                top = logits[0].topk(2).values
                assert (top[0] - top[1]).item() < 0.05 * max(top[0].abs().item(), 1.0), (prompt, weights, same)
    print(f"bf16 vs fp32 greedy agreement (tokens before the first difference): {agree}/{total} = {agree / total:.2f}")
    assert agree > 0
