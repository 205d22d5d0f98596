"""Learned MLP router (complexity-aware MoLoRA): embedding ⊕ complexity features -> 256 hidden -> adapter softmax.

A second head regresses the complexity score, which complexity-aware MoLoRA trains jointly so the hidden layer
keeps the complexity signal the tiers were built from. Training lives in `training/`; this
module holds the network, inference, and the auxiliary load-balance loss both sides agree on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from router_core.centroid import boost_and_truncate, check_route_options
from router_core.complexity import FEATURE_NAMES
from router_core.confidence import ConfidenceMap


class MLPRouterNet(nn.Module):
    """One hidden layer (ReLU, dropout) with a routing head and a complexity-regression head.

    Parameter names (`fc`, `route_head`, `complexity_head`) are the on-disk tensor names of
    `router.safetensors`; renaming them breaks saved routers.
    """

    def __init__(
        self, embed_dim: int, n_adapters: int, complexity_dim: int, hidden: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if embed_dim < 1 or n_adapters < 1 or complexity_dim < 0 or hidden < 1:
            raise ValueError(
                f"bad MLP router shape: embed_dim={embed_dim}, n_adapters={n_adapters}, "
                f"complexity_dim={complexity_dim}, hidden={hidden}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim = embed_dim
        self.n_adapters = n_adapters
        self.complexity_dim = complexity_dim
        self.hidden = hidden
        self.dropout = dropout
        self.fc = nn.Linear(embed_dim + complexity_dim, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.route_head = nn.Linear(hidden, n_adapters)
        self.complexity_head = nn.Linear(hidden, 1)

    @property
    def in_features(self) -> int:
        return self.embed_dim + self.complexity_dim

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """`features` `[B, embed_dim + complexity_dim]` -> (`logits` `[B, n]`, `complexity` `[B]`)."""
        h = self.drop(self.act(self.fc(features)))  # [B, hidden]
        logits = self.route_head(h)  # [B, n]
        complexity = torch.sigmoid(self.complexity_head(h)).squeeze(-1)  # [B]
        return logits, complexity

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape of a saved net, for validating artifacts before loading them."""
        return {name: tuple(t.shape) for name, t in self.state_dict().items()}


def load_balance_loss(probs: Tensor) -> Tensor:
    """Switch-Transformer auxiliary loss `n · Σ_i f_i · P_i` over a batch of router probabilities.

    `f_i` is the fraction of rows whose top choice is adapter i (no gradient), `P_i` the mean
    probability of adapter i (gradient flows here). It is 1.0 at a perfectly balanced batch and
    n when every row picks one adapter, so it penalises the router collapsing to one expert.
    Complexity-aware MoLoRA weights it 0.1; the caller applies the weight. `probs` `[B, n]` -> scalar.
    """
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty [B, n] matrix, got {tuple(probs.shape)}")
    n = probs.shape[1]
    top = probs.detach().argmax(-1)  # [B]
    frac = torch.bincount(top, minlength=n).to(probs.dtype) / probs.shape[0]  # [n]
    mean_prob = probs.mean(0)  # [n]
    return n * (frac * mean_prob).sum()


class MLPRouter:
    """Inference wrapper: the net plus what it was trained against (adapter order, embedder).

    `embedder_id` must match the serving embedder: an MLP over MiniLM vectors means nothing on
    GPT-2 hidden states even when the dimensions happen to agree.
    """

    kind = "mlp"
    per_token = False  # gates per row, from an embedding of the routing window

    def __init__(
        self,
        net: MLPRouterNet,
        adapter_names: Sequence[str],
        embedder_id: str,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        complexity_features: Sequence[str] | None = None,
        confidence_map: ConfidenceMap | None = None,
    ) -> None:
        names = list(adapter_names)
        if len(names) != net.n_adapters:
            raise ValueError(f"{len(names)} adapter names for a net with {net.n_adapters} outputs")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate adapter names: {names}")
        check_route_options(temperature, top_k)
        feats = tuple(complexity_features) if complexity_features is not None else None
        if feats is None:
            feats = FEATURE_NAMES if net.complexity_dim == len(FEATURE_NAMES) else ()
        if len(feats) not in (0, net.complexity_dim):
            raise ValueError(f"{len(feats)} complexity feature names for complexity_dim {net.complexity_dim}")
        self.net = net.eval()
        self.adapter_names: tuple[str, ...] = tuple(names)
        self.embedder_id = embedder_id
        self.temperature = float(temperature)
        self.top_k = top_k
        self.complexity_features: tuple[str, ...] = feats
        # fitted on the validation split by `switchboard-train router` (router_core.confidence):
        # spreads each softmax toward uniform so its top weight is the calibrated confidence
        self.confidence_map = confidence_map

    @property
    def embed_dim(self) -> int:
        return self.net.embed_dim

    @property
    def complexity_dim(self) -> int:
        return self.net.complexity_dim

    @property
    def hidden(self) -> int:
        return self.net.hidden

    @property
    def needs_complexity(self) -> bool:
        """Whether `route` needs complexity vectors (the caller then runs the analyzer)."""
        return self.net.complexity_dim > 0

    def features(self, embeddings: Tensor, complexity: Tensor | None) -> Tensor:
        """The net's input `[B, embed_dim + complexity_dim]`: embedding ⊕ complexity features."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings must be [B, {self.embed_dim}], got {tuple(embeddings.shape)}")
        if self.complexity_dim == 0:
            return embeddings.float()  # [B, d]
        if complexity is None:
            raise ValueError(f"this router needs complexity features [B, {self.complexity_dim}]")
        if complexity.shape != (embeddings.shape[0], self.complexity_dim):
            raise ValueError(
                f"complexity must be [{embeddings.shape[0]}, {self.complexity_dim}], got {tuple(complexity.shape)}"
            )
        return torch.cat([embeddings.float(), complexity.to(embeddings.device).float()], dim=-1)  # [B, d + c]

    @property
    def switch_margin(self) -> float:
        """No score test: the MLP's re-routes are held back by the policy's weight hysteresis only."""
        return 0.0

    def scores(self, embeddings: Tensor, complexity: Tensor | None = None) -> Tensor:
        """The net's logits `[B, n]`."""
        x = self.features(embeddings, complexity)  # [B, d + c]
        with torch.no_grad():
            logits, _ = self.net(x.to(next(self.net.parameters()).device))  # [B, n]
        return logits.float().to(embeddings.device)

    def route(
        self,
        embeddings: Tensor,
        complexity: Tensor | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        form: Tensor | None = None,
    ) -> Tensor:
        """Softmax weights `[B, n]` (rows sum to 1), optionally truncated to the `top_k` largest.

        `temperature` / `top_k` override the router's own for one request; `form` is ignored
        (the `Router` signature).
        """
        temp = self.temperature if temperature is None else temperature
        k = self.top_k if top_k is None else top_k
        check_route_options(temp, k)
        logits = self.scores(embeddings, complexity)  # [B, n]
        probs = torch.softmax(logits / temp, dim=-1)  # [B, n]
        if self.confidence_map is not None:
            probs = self.confidence_map.spread(probs, logits)  # [B, n] top weight <= confidence
        return boost_and_truncate(probs, probs.argmax(-1), 1.0, k)  # [B, n]

    def predict_complexity(self, embeddings: Tensor, complexity: Tensor | None = None) -> Tensor:
        """The regression head's complexity score `[B]` in [0, 1]."""
        x = self.features(embeddings, complexity)  # [B, d + c]
        with torch.no_grad():
            _, score = self.net(x.to(next(self.net.parameters()).device))  # [B]
        return score.to(embeddings.device)

    def __repr__(self) -> str:
        return (
            f"MLPRouter(adapters={list(self.adapter_names)}, embedder_id={self.embedder_id!r}, "
            f"embed_dim={self.embed_dim}, complexity_dim={self.complexity_dim}, hidden={self.hidden})"
        )
