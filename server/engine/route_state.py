"""What routing keeps for one sequence between steps, apart from what its request asked.

A request asks for a prompt, sampling, stop criteria and a routing spec (`Sequence`); routing
then keeps, per sequence, the gates in force, the router's last route vector (for hysteresis),
the hidden states of its routing window (for the `base` embedder), the trace of the gates per
generated token and how many decisions it took. The engine's routing step
(`server.engine.route_step`) and the gater (`server.routing.gater`) read and write this; the request
side never changes once the sequence is submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from router_core.policy import RoutingTrace, last_reroute


@dataclass
class RouteState:
    gates: dict[str, float] = field(default_factory=dict)  # the mixture in force
    route_vector: torch.Tensor | None = None  # last router output, for hysteresis
    route_names: tuple[str, ...] | None = None  # the adapters `route_vector` is over
    hidden_tail: torch.Tensor | None = None  # [W, d] last hidden states, for the `base` embedder
    trace: RoutingTrace = field(default_factory=RoutingTrace)  # gates in force per generated token
    reroutes: int = 0  # routing decisions taken (the first one included)
    # a re-route's gates waiting for an adapter's factors to be read from disk (engine.loader):
    # the row keeps `gates` meanwhile
    pending: dict[str, float] | None = None
    # per-token routing (Arrow): the last forward's mean weight per adapter over layers and tokens
    layer_weights: dict[str, float] | None = None
    _stretch: tuple[int, dict[str, float], int] | None = None  # (first token, summed weights, tokens)

    def in_force(self, token_index: int, every: int) -> tuple[int, dict[str, float]]:
        """What the trace records for generated token `token_index`: the gates in force, or for
        a row gated per token, the mean over its stretch of the re-route cadence (from
        `last_reroute`) of each token's mean weight per adapter over the layers, keyed by the
        stretch's first token (a later record for the same token replaces the earlier one)."""
        if self.layer_weights is None:
            return token_index, self.gates
        start = last_reroute(token_index, every)
        if self._stretch is None or self._stretch[0] != start:
            self._stretch = (start, {}, 0)
        _, sums, n = self._stretch
        for name, w in self.layer_weights.items():
            sums[name] = sums.get(name, 0.0) + w
        self._stretch = (start, sums, n + 1)
        return start, {name: w / (n + 1) for name, w in sums.items()}

    @property
    def top_adapter(self) -> str:
        return max(self.gates, key=self.gates.__getitem__) if self.gates else "base"

    def apply(self, gates: dict[str, float]) -> bool:
        """Put a routing decision's `gates` in force; returns whether it switched the top
        adapter (False for the first decision)."""
        before = self.top_adapter if self.gates else None
        self.gates = gates
        self.reroutes += 1
        return before is not None and self.top_adapter != before

    def keep_hidden(self, hidden: torch.Tensor, window: int | None) -> None:
        """Append hidden states [T, d] of newly processed tokens, keeping the last `window`."""
        tail = hidden if self.hidden_tail is None else torch.cat([self.hidden_tail, hidden])
        self.hidden_tail = tail if window is None else tail[-window:]
