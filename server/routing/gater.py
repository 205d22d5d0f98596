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
from router_core.policy import to_host
from router_core.router import Router
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

    def _form(self, router: Router, seqs: list[Sequence], texts: list[str]) -> torch.Tensor | None:
        """P(code, request, prose) `[b, 3]` of the rows making their first decision (the prompt,
        whose sentences show their form), NaN rows for re-routes (a 32-token window does not, and
        a parse per re-route would cost decode time); None when `router` reads no form."""
        reader = self.catalogue.form_reader
        first = [j for j, seq in enumerate(seqs) if not seq.generated]
        if reader is None or getattr(router, "form_groups", None) is None or not first:
            return None
        form = torch.full((len(seqs), 3), float("nan"))  # [b, 3]
        form[first] = reader.read([texts[j] for j in first])
        return form

    def route(self, seqs: list[Sequence], contexts: list[str] | None = None) -> list[dict[str, float]]:
        """Gates per sequence. `contexts` (from `contexts()`) lets the engine route on a
        snapshot taken on its thread while this runs on another.

        Rows are grouped by router and request options (`temperature`, `top_k`): one embedding
        call for every row that embeds, one policy call (`ReroutePolicy.propose`) per group, and
        one host read (`to_host`) for all the rows together. On a GPU each read is a sync; the
        per-row loop this replaces read once per row and router."""
        encoder = self.catalogue.encoder

        def text(i: int) -> str:
            return contexts[i] if contexts is not None else seqs[i].context_text(self.window(seqs[i]))

        out: list[dict[str, float] | None] = [None] * len(seqs)
        groups: dict[tuple[int, float | None, int | None], tuple[Router, list[int]]] = {}
        for i, seq in enumerate(seqs):
            router = self.catalogue.router(seq.routing.router)
            if router is None:  # unloaded while the request ran: keep the gates it has
                out[i] = seq.route.gates
                continue
            key = (id(router), seq.routing.temperature, seq.routing.top_k)
            groups.setdefault(key, (router, []))[1].append(i)
        embedded = [i for router, rows in groups.values() if not router.per_token for i in rows]  # Arrow: none
        picked = self.embed([seqs[i] for i in embedded], [text(i) for i in embedded] if encoder else None) \
            if embedded else None  # [E, d], group by group
        proposals: list[tuple[Router, list[int], torch.Tensor]] = []
        at = 0
        for (_, temperature, top_k), (router, rows) in groups.items():
            if router.per_token or picked is None:
                embeddings = torch.zeros(len(rows), 0)
            else:
                embeddings, at = picked[at:at + len(rows)], at + len(rows)  # [b, d]
            complexity = self.catalogue.analyzer().vectors([text(i) for i in rows]) \
                if router.needs_complexity else None  # [b, c]
            states = [seqs[i].route for i in rows]
            vectors = self.policy.propose(router, embeddings, complexity=complexity,
                                          previous=[s.route_vector for s in states],
                                          previous_names=[s.route_names for s in states],
                                          temperature=temperature, top_k=top_k,
                                          form=self._form(router, [seqs[i] for i in rows],
                                                          [text(i) for i in rows]))  # [b, n]
            proposals.append((router, rows, vectors))
        host = to_host([vectors for _, _, vectors in proposals])  # the step's one read
        for (router, rows, vectors), values in zip(proposals, host, strict=True):
            for i, decision in zip(rows, self.policy.decisions(router, vectors, [seqs[i].versions for i in rows],
                                                               values), strict=True):
                seqs[i].route.route_vector, seqs[i].route.route_names = decision.vector, decision.names
                out[i] = decision.gates
        return [gates if gates is not None else {} for gates in out]
