"""The gated LoRA mixture used by eval and joint training, checked against PEFT itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import GPT2LMHeadModel

from training.eval_perplexity import context_length
from training.mixture import LoraMixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mixture(tiny_model_dir: Path, store: Path, trainable: bool = False) -> LoraMixture:
    base = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    mix = LoraMixture(base, {"alpha": store / "alpha", "beta": store / "beta"}, trainable=trainable)
    mix.model.eval()
    return mix


@torch.no_grad()
def test_gates_reproduce_base_single_adapters_and_cat_merge(tiny_model_dir: Path, store: Path) -> None:
    x = torch.randint(0, 300, (2, 12))
    base = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    mix = _mixture(tiny_model_dir, store)
    mix.set_gates(mix.one_hot(None, 2))
    assert torch.equal(mix.model(x).logits, base(x).logits)
    for name in ("alpha", "beta"):
        single = PeftModel.from_pretrained(
            GPT2LMHeadModel.from_pretrained(tiny_model_dir), str(store / name)
        ).eval()
        mix.set_gates(mix.one_hot(name, 2))
        assert (mix.model(x).logits - single(x).logits).abs().max() <= 1e-5
    ref = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(tiny_model_dir), str(store / "alpha"), "alpha"
    )
    ref.load_adapter(str(store / "beta"), adapter_name="beta")
    ref.add_weighted_adapter(["alpha", "beta"], [0.3, 0.7], "mix", combination_type="cat")
    ref.set_adapter("mix")
    ref.eval()
    mix.set_gates(torch.tensor([[0.3, 0.7], [0.3, 0.7]]))
    assert (mix.model(x).logits - ref(x).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_per_position_gates_are_causal(tiny_model_dir: Path, store: Path) -> None:
    x = torch.randint(0, 300, (1, 10))
    mix = _mixture(tiny_model_dir, store)
    g = torch.zeros(1, 10, 2)
    g[:, :5, 0] = 1.0
    g[:, 5:, 1] = 1.0
    mix.set_gates(g)
    switched = mix.model(x).logits
    mix.set_gates(mix.one_hot("alpha", 1))
    alpha_only = mix.model(x).logits
    assert torch.equal(switched[:, :5], alpha_only[:, :5])  # earlier positions never see later gates
    assert (switched[:, 5:] - alpha_only[:, 5:]).abs().max() > 1e-4


def test_gates_are_differentiable(tiny_model_dir: Path, store: Path) -> None:
    mix = _mixture(tiny_model_dir, store, trainable=True)
    gates = torch.tensor([[0.5, 0.5]], requires_grad=True)
    mix.set_gates(gates)
    x = torch.randint(0, 300, (1, 8))
    mix.model(input_ids=x, labels=x).loss.backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    assert all(p.grad is not None for p in mix.lora_parameters(["alpha"]))


def test_reroute_context_lengths_follow_the_server_policy() -> None:
    # prompt of 4 tokens, re-route every 2: prefill and token 0/1 use the prompt, then 6, 8, ...
    got = [context_length(pos, 4, 2, 12) for pos in range(12)]
    assert got == [4, 4, 4, 4, 4, 6, 6, 8, 8, 10, 10, 12]
    assert [context_length(pos, 4, 0, 12) for pos in range(12)] == [4] * 12
