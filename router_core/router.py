"""The one interface every router kind implements, so nothing outside `router_core` needs to know
which kind it holds.

A router maps an embedding of a routing window to a *route vector* over its own adapter list.
What happens to that vector next (the re-route cadence, hysteresis, the switch margin, dropping
adapters a request does not hold and renormalising) is the re-route policy's job
(`router_core.policy.ReroutePolicy.decide`), the same for every kind.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Router(Protocol):
    """What the gater, the catalogue, the admin API and the evaluation may rely on."""

    kind: str  # "centroid", "mlp", ...: reported by GET /admin/routers and stored with artifacts
    adapter_names: tuple[str, ...]  # the order of the route vector's entries
    # True: the LoRA layers gate each token themselves (Arrow, router_core/arrow.py); the route
    # vector only names the candidates, and the router needs no embedding
    per_token: bool

    @property
    def needs_complexity(self) -> bool:
        """Whether `route` needs complexity vectors beside the embeddings (the caller then runs
        the analyzer on the window's text)."""
        ...

    @property
    def switch_margin(self) -> float:
        """How far (in `scores` units) a re-route's new top adapter must out-score the current one
        to replace it; 0 = no score test."""
        ...

    def scores(self, embeddings: Tensor, complexity: Tensor | None = None) -> Tensor:
        """The evidence behind the weights, `[B, n]`: higher = more this adapter's text."""
        ...

    def route(self, embeddings: Tensor, complexity: Tensor | None = None, *,
              temperature: float | None = None, top_k: int | None = None, form: Tensor | None = None) -> Tensor:
        """Route vectors `[B, n]`: rows sum to 1, or are all zero (= the base model).
        `temperature` / `top_k` override the router's own for one request; `form` `[B, 3]` is each
        text's P(code, request, prose) (`router_core.form`), used by a router that reads form
        (the centroid router with form groups) and ignored by the others."""
        ...
