"""The grouped prefill (`MultiLoRAConv1D._forward_grouped`): rows on different adapters each
computed against their own factors only, against a float64 reference of
y = x W + b + Σ_k g_k (x A_k) B_k; taken only where it saves work; an overflowing adapter
confined to the rows that weight it."""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from server.engine.lora_layer import LoRABatchContext, MultiLoRAConv1D

D_IN, D_OUT, SLOTS, T = 12, 20, 4, 5
RANKS = (2, 3, 2, 4)


def layer_and_factors() -> tuple[MultiLoRAConv1D, LoRABatchContext, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    conv = Conv1D(D_OUT, D_IN)
    with torch.no_grad():
        conv.weight.normal_(0, 0.3, generator=g)
        conv.bias.normal_(0, 0.1, generator=g)
    ctx = LoRABatchContext()
    layer = MultiLoRAConv1D(conv, SLOTS, ctx)
    factors = []
    for slot, r in enumerate(RANKS):
        a, b = torch.randn(D_IN, r, generator=g), torch.randn(r, D_OUT, generator=g)
        layer.set_slot(slot, a, b)
        factors.append((a, b))
    return layer, ctx, factors


def reference(layer: MultiLoRAConv1D, x: torch.Tensor, active: tuple[int, ...], gates: torch.Tensor,
              factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    x64 = x.double()
    y = x64 @ layer.base.weight.double() + layer.base.bias.double()
    for col, slot in enumerate(active):
        a, b = factors[slot]
        y = y + gates[:, col].double()[:, None, None] * ((x64 @ a.double()) @ b.double())
    return y


def test_rows_on_their_own_adapters_match_the_reference_and_take_the_grouped_path(monkeypatch):
    layer, ctx, factors = layer_and_factors()
    x = torch.randn(5, T, D_IN, generator=torch.Generator().manual_seed(1))
    active = (0, 1, 2, 3)
    # one adapter each, a row on none, a mixture: 5 of 20 (row, adapter) pairs
    gates = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2.0], [0.3, 0, 0.7, 0]])
    taken = []
    real = MultiLoRAConv1D._forward_grouped
    monkeypatch.setattr(MultiLoRAConv1D, "_forward_grouped",
                        lambda self, *a: (taken.append(1), real(self, *a))[1])
    with torch.no_grad(), ctx.applied(active, gates, torch.tensor([0, 1, 3, 4])):
        got = layer(x)
        decode = layer(x[:, :1])  # one token a row: the concatenated path
    assert taken == [1]
    want = reference(layer, x, active, gates, factors)
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5)
    assert torch.allclose(decode.double(), want[:, :1], atol=1e-4, rtol=1e-5)
    # every row on every adapter (a dense mixture): nothing to save, the concatenated path
    dense = torch.full((5, 4), 0.25)
    with torch.no_grad(), ctx.applied(active, dense):
        got = layer(x)
    assert taken == [1]
    assert torch.allclose(got.double(), reference(layer, x, active, dense, factors), atol=1e-4, rtol=1e-5)


def test_an_overflowing_adapter_reaches_only_its_own_rows():
    layer, ctx, factors = layer_and_factors()
    huge = torch.full((D_IN, RANKS[1]), 3e38)
    layer.set_slot(1, huge, factors[1][1])
    x = torch.randn(4, T, D_IN, generator=torch.Generator().manual_seed(2))
    active = (0, 1, 2, 3)
    gates = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    with torch.no_grad(), ctx.applied(active, gates):
        got = layer(x)
    assert not torch.isfinite(got[1]).all()
    keep = [0, 2, 3]
    want = reference(layer, x[keep], (0, 2, 3), gates[keep][:, [0, 2, 3]], factors)
    assert torch.allclose(got[keep].double(), want, atol=1e-4, rtol=1e-5)


def test_bf16_weights_grouped_as_the_concatenated_path(monkeypatch):
    """bf16 weights (fp32 factors where oneDNN serves the base matmul): the grouped prefill
    agrees with the concatenated path to bf16's rounding of the output."""
    layer, ctx, factors = layer_and_factors()
    layer.base.to(torch.bfloat16)
    layer.__init__(layer.base, SLOTS, ctx)  # re-wrapped: the bf16 weight's storage and factor dtype
    for slot, (a, b) in enumerate(factors):
        layer.set_slot(slot, a.bfloat16(), b.bfloat16())
    x = torch.randn(5, T, D_IN, generator=torch.Generator().manual_seed(3)).bfloat16()
    active = (0, 1, 2, 3)
    gates = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2.0], [0.3, 0, 0.7, 0]]).bfloat16()
    with torch.no_grad(), ctx.applied(active, gates, torch.tensor([0, 1, 3, 4])):
        assert ctx.groups() is not None
        grouped = layer(x)
    monkeypatch.setattr(LoRABatchContext, "groups", lambda self: None)
    with torch.no_grad(), ctx.applied(active, gates, torch.tensor([0, 1, 3, 4])):
        concat = layer(x)
    assert grouped.dtype == torch.bfloat16
    assert torch.allclose(grouped.float(), concat.float(), atol=0.05, rtol=0.02)
