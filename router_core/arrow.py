"""Arrow: data-free routing per token and per layer from the adapters' own weights.

"Towards Modular LLMs by Building and Reusing a Library of LoRAs" (arXiv 2405.11157), as PEFT
ships it (`ArrowConfig`, `create_arrow_model`, `peft/tuners/lora/arrow.py`): each adapter's
*prototype* in a layer is the top right singular vector of its ΔW = B·A (the input direction
the adapter changes most); each token's input x to that layer scores every candidate adapter by
|x · prototype| (sign-free, as a singular vector's sign is arbitrary), keeps the `top_k` best and
turns them into gates with a softmax at `temperature`. No examples, no centroids, no router
training: any adapter is routable.

Here the prototypes are computed once per adapter version when it is registered (the engine's
registry calls `prototypes`), exactly (r x r eigendecompositions, `top_directions`) rather than
by PEFT's 15 power iterations from a random start; the per-token gates are computed inside the batched
LoRA layer (`server.engine.lora_layer`) for the rows that use this router, beside rows with
fixed, manual or centroid gates. `ArrowRouter` is the `Router` the catalogue lists: its route
vector only names the candidate adapters (uniform weights); the weights a token really gets
are decided in the layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_TOP_K = 3  # PEFT's ArrowConfig default
DEFAULT_TEMPERATURE = 1.0  # PEFT's ArrowConfig default (router_temperature)


def prototype(a: Tensor, b: Tensor) -> Tensor:
    """The top right singular vector (input space, `[in]`, unit norm, fp32) of one adapter's
    layer, from its factors in the engine's layout: `a` `[in, r]`, `b` `[r, out]` (x ↦ x a b,
    the transpose of PEFT's ΔW = B·A, so PEFT's right singular vector is our left one).
    See `top_directions`, which computes it for a batch of layers at once."""
    return top_directions(a[None], b[None])[0]


@torch.no_grad()
def top_directions(a: Tensor, b: Tensor) -> Tensor:
    """`prototype` for n layers of one shape at once: `a` `[n, in, r]`, `b` `[n, r, out]` -> `[n, in]`.

    The r x r route, never ΔW: with R any square root of b bᵀ (Rᵀ R = b bᵀ, from its
    eigendecomposition), a b and M = a Rᵀ have the same left singular vectors, and M's top one
    is M w for w the top eigenvector of Mᵀ M = R (aᵀ a) Rᵀ. So a registration costs two Gram
    products per layer and two batched r x r eigendecompositions per layer shape, where a thin
    SVD per layer (the first version) cost several times as much (docs/performance.md). Each
    layer's factors are rescaled to unit max entry first: the direction does not depend on the
    scale, and an adapter with huge-but-finite factors (accepted up to the serving dtype's bound)
    would overflow its Gram products; rescaled, every entry of them is at most in or out, so fp32
    holds them, to ~1e-6 of the direction for any spectral gap above 1e-3 of σ₁² (ties have no
    defined top direction in any method). The sign is fixed (largest-magnitude entry positive)
    so a version's prototype is reproducible; Arrow's scores are sign-free anyway."""
    a = a.detach().float()
    b = b.detach().float()
    a = a / a.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-30)
    b = b / b.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-30)
    lam, vec = torch.linalg.eigh(b @ b.mT)  # b bᵀ = V Λ Vᵀ, [n, r, r]
    rt = vec * lam.clamp(min=0).sqrt()[:, None, :]  # Rᵀ = V Λ^½, so Rᵀ R = b bᵀ
    _, w = torch.linalg.eigh(rt.mT @ (a.mT @ a) @ rt)  # eigenvalues ascending: the top one last
    v = (a @ (rt @ w[:, :, -1:]))[:, :, 0]  # [n, in] = M w
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp(min=1e-30)
    top = v.gather(1, v.abs().argmax(dim=1, keepdim=True))  # [n, 1]
    return v * torch.where(top < 0, -1.0, 1.0)


def prototypes(tensors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Prototype `[in]` per module path of one adapter (`AdapterWeights.tensors`: A, B·scale;
    the scale does not change the direction), batched over the layers of each shape."""
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for path, (a, b) in tensors.items():
        groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(path)
    out: dict[str, Tensor] = {}
    for paths in groups.values():
        v = top_directions(torch.stack([tensors[p][0] for p in paths]), torch.stack([tensors[p][1] for p in paths]))
        out.update(zip(paths, v.unbind(0), strict=True))
    return {path: out[path] for path in tensors}


def token_gates(x: Tensor, protos: Tensor, candidates: Tensor, top_k: Tensor, temperature: Tensor) -> Tensor:
    """Arrow's gates per token: `[rows, T, E]`.

    `x` `[rows, T, in]` the layer's input for the Arrow rows; `protos` `[E, in]` the prototypes
    of the E active adapters in this layer; `candidates` `[rows, E]` bool, the adapters each row
    may use (those it holds and that have weights in this layer); `top_k` `[rows]` long and
    `temperature` `[rows]` float, per request. As PEFT: |x · p|, top-k, the rest -inf, softmax
    of score / temperature. A row with no candidate gets zeros (the base model)."""
    sim = (x.to(protos.dtype) @ protos.t()).abs()  # [rows, T, E]
    sim = sim.masked_fill(~candidates[:, None, :], float("-inf"))
    E = sim.shape[-1]
    kmax = int(min(int(top_k.max()), E))
    top_v, idx = sim.topk(kmax, dim=-1)  # [rows, T, kmax], sorted descending
    keep = torch.arange(kmax, device=x.device)[None, :] < top_k[:, None]  # [rows, kmax]
    top_v = top_v.masked_fill(~keep[:, None, :], float("-inf"))
    full = torch.full_like(sim, float("-inf")).scatter(-1, idx, top_v)
    gates = torch.softmax(full / temperature[:, None, None].to(full.dtype), dim=-1)
    return torch.nan_to_num(gates, nan=0.0)  # all -inf (no candidate) -> 0


class ArrowRouter:
    """The `Router` the catalogue lists as `arrow`: every registered adapter is a candidate.

    It needs no embedding: `route` gives each candidate the same weight, which the re-route
    policy restricts to the adapters a row holds; the engine then knows the row's candidates,
    and the layers decide each token's weights (`token_gates`). `per_token` tells the gater and
    the engine so, without either naming this class."""

    kind = "arrow"
    per_token = True

    def __init__(self, adapter_names: list[str] | tuple[str, ...], top_k: int = DEFAULT_TOP_K,
                 temperature: float = DEFAULT_TEMPERATURE) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.adapter_names = tuple(adapter_names)
        self.top_k, self.temperature = int(top_k), float(temperature)

    @property
    def needs_complexity(self) -> bool:
        return False

    @property
    def needs_embedding(self) -> bool:
        return False

    @property
    def switch_margin(self) -> float:
        return 0.0

    def scores(self, embeddings: Tensor, complexity: Tensor | None = None) -> Tensor:
        """No evidence before the layers see the tokens: zeros `[B, n]`."""
        return torch.zeros(embeddings.shape[0], len(self.adapter_names))

    def route(self, embeddings: Tensor, complexity: Tensor | None = None, *,
              temperature: float | None = None, top_k: int | None = None, form: Tensor | None = None) -> Tensor:
        """Uniform over the candidates `[B, n]` (the layers pick per token); `form` is ignored."""
        n = len(self.adapter_names)
        return torch.full((embeddings.shape[0], n), 1.0 / n) if n else torch.zeros(embeddings.shape[0], 0)

    def settings(self, top_k: int | None, temperature: float | None) -> tuple[int, float]:
        """A request's (top_k, temperature): its own, else the router's."""
        return (self.top_k if top_k is None else int(top_k),
                self.temperature if temperature is None else float(temperature))
