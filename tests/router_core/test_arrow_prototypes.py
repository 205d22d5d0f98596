"""Arrow's prototypes computed for all of an adapter's layers at once (`router_core.arrow.prototypes`,
batched r x r eigendecompositions) against the definition: the top right singular vector of each
layer's ΔW, from a float64 SVD of ΔW itself, with the same sign convention."""

from __future__ import annotations

import torch

from router_core.arrow import prototype, prototypes


def _reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    u = torch.linalg.svd(a.double() @ b.double()).U[:, 0]  # our x a b is PEFT's (B A)ᵀ: its right vector is our left one
    return (u * torch.sign(u[u.abs().argmax()])).float()


def test_batched_prototypes_are_each_layers_top_singular_vector():
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(3):  # two shapes, interleaved, so the groups must be put back in order
        tensors[f"h.{layer}.c_attn"] = (torch.randn(24, 4, generator=gen) * 0.05, torch.randn(4, 72, generator=gen) * 0.01)
        tensors[f"h.{layer}.c_proj"] = (torch.randn(96, 8, generator=gen), torch.randn(8, 24, generator=gen) * 3)
    tensors["h.0.c_fc"] = (torch.randn(24, 4, generator=gen) * 1e30, torch.randn(4, 96, generator=gen) * 1e30)  # huge, finite
    b_rank1 = torch.randn(1, 72, generator=gen).repeat(4, 1)  # rank-deficient B: R is singular
    tensors["h.1.c_fc"] = (torch.randn(24, 4, generator=gen), b_rank1)
    got = prototypes(tensors)
    assert list(got) == list(tensors)
    for path, (a, b) in tensors.items():
        scale = 1e-30 if path == "h.0.c_fc" else 1.0
        want = _reference(a * scale, b * scale)
        assert got[path].dtype == torch.float32 and torch.isfinite(got[path]).all()
        assert torch.allclose(got[path], want, atol=1e-5), path
        assert torch.allclose(prototype(a, b), got[path], atol=1e-6), path
