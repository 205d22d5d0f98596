"""The per-step gater: the engine's `GateSource` for `model: "auto"` rows.

The engine calls it on its own thread (and, for a sentence encoder, on a side thread one step
ahead) for the rows whose re-route is due (`router_core.policy.reroute_due`). It embeds each
row's routing window with the catalogue's embedder, asks the row's router for a route vector,
keeps the previous top adapter unless the new one wins by the hysteresis margin (for the
centroid router also by its switch margin on the scores), and turns the
vector into the row's gates over the adapters the request holds. It reads the catalogue
(`server.routing.catalogue.RouterCatalogue`) and never changes it.
"""

from __future__ import annotations

import torch

from router_core.centroid import CentroidRouter
from router_core.embedders import pool_hidden
from router_core.mlp import MLPRouter
from router_core.policy import ReroutePolicy, weights_dict
from server.engine.sequence import Sequence
from server.routing.catalogue import RouterCatalogue
from server.settings import RoutingSettings


class Gater:
    """Gates for the rows that are due, from the routers in `catalogue`."""

    def __init__(self, catalogue: RouterCatalogue, settings: RoutingSettings) -> None:
        self.catalogue, self.settings = catalogue, settings
        self.policy = ReroutePolicy(settings.reroute_every, settings.hysteresis)

    def needs_hidden(self, seq: Sequence) -> bool:
        """Whether `seq` is routed on the resident model's hidden states (the `base` embedder),
        which the engine then keeps for its routing window."""
        return self.catalogue.encoder is None

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
        contexts = contexts if contexts is not None else (self.contexts(seqs) if encoder else None)
        embeddings = self.embed(seqs, contexts)  # [B, d]
        out: list[dict[str, float]] = []
        for i, seq in enumerate(seqs):
            spec = seq.routing
            router = self.catalogue.router(spec.router)
            if router is None:  # unloaded while the request ran: keep the gates it has
                out.append(seq.route.gates)
                continue
            complexity = None
            if isinstance(router, MLPRouter) and router.needs_complexity:
                text = contexts[i] if contexts is not None else seq.context_text(self.window(seq))
                complexity = self.catalogue.analyzer().vectors([text])
            vector = router.route(embeddings[i:i + 1], complexity, temperature=spec.temperature,
                                  top_k=spec.top_k)[0]  # [n]: the route vector
            names = tuple(router.adapter_names)
            state = seq.route
            if state.route_vector is not None and state.route_names == names:
                scores, margin = None, 0.0
                if isinstance(router, CentroidRouter) and router.switch_margin > 0:
                    scores, margin = router.scores(embeddings[i:i + 1])[0], router.switch_margin  # [n]
                vector = self.policy.stabilise(state.route_vector, vector, scores, margin)
            state.route_vector, state.route_names = vector, names
            gates = {n: w for n, w in weights_dict(names, vector).items() if n in seq.versions}
            total = sum(gates.values())
            out.append({n: w / total for n, w in gates.items()} if total > 0 else {})
        return out
