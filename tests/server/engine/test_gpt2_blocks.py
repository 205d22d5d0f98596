"""`gpt2.forward` reads each block's parts once per model (`gpt2.blocks`); wrapping the model's
projections afterwards (`lora_layer.wrap_targets`) must drop that copy, or the forward would keep
calling the unwrapped modules and silently ignore every adapter."""

from __future__ import annotations

import torch

from server.engine import gpt2
from server.engine.kv_cache import KVCache
from server.engine.lora_layer import LoRABatchContext, wrap_targets
from tests.tiny import build_model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    cache = KVCache(n_layer=cfg.n_layer, n_head=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head,
                    max_positions=cfg.n_positions, dtype=torch.float32, device=torch.device("cpu"))
    pos = torch.arange(ids.shape[1])[None, :]
    logits, _ = gpt2.forward(model, ids, pos, cache, starts=[0])
    assert logits is not None
    return logits


@torch.inference_mode()
def test_forward_equals_hf_and_follows_wrapping() -> None:
    model, _ = build_model(seed=3)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    base = _logits(model, ids)  # caches the unwrapped blocks
    torch.testing.assert_close(base, model(ids).logits[:, -1], rtol=1e-5, atol=1e-5)

    ctx = LoRABatchContext()
    layers = wrap_targets(model, {"c_attn"}, num_slots=1, ctx=ctx)
    assert all(blk.c_attn.__self__ is layers[f"transformer.h.{i}.attn.c_attn"]  # type: ignore[attr-defined]
               for i, blk in enumerate(gpt2.blocks(model)))
    gen = torch.Generator().manual_seed(0)
    for layer in layers.values():
        layer.set_slot(0, torch.randn(layer.in_features, 4, generator=gen),
                       torch.randn(4, layer.out_features, generator=gen))
    torch.testing.assert_close(_logits(model, ids), base)  # no gates: the base model
    with ctx.applied((0,), torch.ones(1, 1), None):
        adapted = _logits(model, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter is reached
