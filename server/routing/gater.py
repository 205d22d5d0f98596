"""The per-step gater: the engine's `GateSource` for `model: "auto"` rows.

The engine calls it on its own thread (and, for a sentence encoder, on a side thread one step
ahead) for the rows whose re-route is due (`router_core.policy.reroute_due`). The gater's job is
the embedding: each row's routing window through the catalogue's embedder (and the complexity
analyzer when the row's router needs it). Everything after that, whichever router kind the row
uses, is the re-route policy's (`router_core.policy.ReroutePolicy.decide`). It reads the catalogue
(`server.routing.catalogue.RouterCatalogue`) and never changes it.
"""

from __future__ import annotations

import torch

from router_core.embedders import pool_hidden
from server.engine.sequence import Sequence
from server.routing.catalogue import RouterCatalogue
from server.settings import RoutingSettings


class Gater:
    """Gates for the rows that are due, from the routers in `catalogue`."""

    def __init__(self, catalogue: RouterCatalogue, settings: RoutingSettings) -> None:
        self.catalogue, self.settings = catalogue, settings
        self.policy = catalogue.policy

    def needs_hidden(self, seq: Sequence) -> bool:
        """Whether `seq` is routed on the resident model's hidden states (the `base` embedder),
        which the engine then keeps for its routing window. A router that gates per token in
        the layers (Arrow) embeds nothing."""
        return self.catalogue.encoder is None and not self._per_token(seq)

    def _per_token(self, seq: Sequence) -> bool:
        router = self.catalogue.router(seq.routing.router)
        return router is not None and router.per_token

    def window(self, seq: Sequence) -> int:
        """The first decision sees the prompt (up to the catalogue's `prompt_window`), re-routes
        the sliding routing window."""
        return self.catalogue.prompt_window if not seq.generated else self.settings.route_window

    def contexts(self, seqs: list[Sequence]) -> list[str]:
        """The text each sequence is routed on (see `window`)."""
        return [s.context_text(self.window(s)) for s in seqs]

    def embed(self, seqs: list[Sequence], contexts: list[str] | None = None) -> torch.Tensor:
        """One embedding per sequence [B, d]: its routing window's text through the sentence
        encoder, or its kept hidden states mean-pooled."""
        encoder = self.catalogue.encoder
        if encoder is not None:
            return encoder.embed_texts(contexts if contexts is not None else self.contexts(seqs))  # [B, d]
        tails = [s.route.hidden_tail for s in seqs if s.route.hidden_tail is not None]
        return torch.cat([pool_hidden(t[None].float()) for t in tails])  # [B, d]

    def route(self, seqs: list[Sequence], contexts: list[str] | None = None) -> list[dict[str, float]]:
        """Gates per sequence. `contexts` (from `contexts()`) lets the engine route on a
        snapshot taken on its thread while this runs on another."""
        encoder = self.catalogue.encoder
        embedded = [i for i, s in enumerate(seqs) if not self._per_token(s)]  # Arrow rows embed nothing
        contexts = contexts if contexts is not None else (self.contexts(seqs) if encoder and embedded else None)
        embeddings = torch.zeros(len(seqs), 0)
        if embedded:
            picked = self.embed([seqs[i] for i in embedded], None if contexts is None else [contexts[i] for i in embedded])
            embeddings = torch.zeros(len(seqs), picked.shape[1], dtype=picked.dtype, device=picked.device)
            embeddings[embedded] = picked  # [B, d]
        out: list[dict[str, float]] = []
        for i, seq in enumerate(seqs):
            spec, state = seq.routing, seq.route
            router = self.catalogue.router(spec.router)
            if router is None:  # unloaded while the request ran: keep the gates it has
                out.append(state.gates)
                continue
            complexity = None
            if router.needs_complexity:
                text = contexts[i] if contexts is not None else seq.context_text(self.window(seq))
                complexity = self.catalogue.analyzer().vectors([text])  # [1, c]
            decision = self.policy.decide(router, embeddings[i:i + 1], seq.versions, complexity=complexity,
                                          previous=state.route_vector, previous_names=state.route_names,
                                          temperature=spec.temperature, top_k=spec.top_k)
            state.route_vector, state.route_names = decision.vector, decision.names
            out.append(decision.gates)
        return out
