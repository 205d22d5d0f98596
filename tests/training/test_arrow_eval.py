"""Arrow in the evaluation: per-token gates on the eval's LoRA mixture."""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel

from tests.tiny import build_tokenizer, make_adapter
from training.arrow_eval import ArrowGates
from training.mixture import LoraMixture


def test_arrow_gates_on_the_mixture(tiny_model_dir, tmp_path):
    folders = {n: make_adapter(tiny_model_dir, tmp_path / n, seed=i + 1, scale_b=3.0) for i, n in enumerate(("a", "b"))}
    mixture = LoraMixture(GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval(), folders)
    arrow = ArrowGates(mixture, top_k=1)
    ids = torch.randint(0, 300, (3, 7))
    with torch.no_grad():
        plain = mixture.model(input_ids=ids).logits  # the mixture's sum of both adapters
        with arrow.applied():  # batches of different sizes (the perplexity loop)
            routed = mixture.model(input_ids=ids).logits
            mixture.model(input_ids=ids[:2])
    assert not torch.allclose(plain, routed, atol=1e-4)  # Arrow's gates did apply
    w = arrow.text_weights(build_tokenizer(), ["def f(x): return x", "Once upon a time"], 32)
    assert w.shape == (2, 2) and torch.allclose(w.sum(1), torch.ones(2))
    arrow.remove()
