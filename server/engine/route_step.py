"""The engine's side of routing within a step: which rows are due, and putting their new gates in force.

The gater (`GateSource`, `server.routing.gater.Gater`) computes gates; this decides when to ask it and
copes when it fails. An auto-routed row is re-routed before the tokens of the re-route cadence
(`router_core.policy.reroute_due`). Text-encoder re-routes are started one step early on a side
thread, so they overlap the decode forward (their context lacks the newest token); the step
that needs them takes their result, or routes the row itself if that early pass failed.
A routing pass that fails is retried row by row, so only the row that causes it fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from router_core.policy import reroute_due
from server.engine.sequence import Sequence


class GateSource(Protocol):
    """Computes routed gates for the rows that are due; implemented by `server.routing.gater.Gater`."""

    def needs_hidden(self, seq: Sequence) -> bool: ...

    def contexts(self, seqs: list[Sequence]) -> list[str]: ...

    def route(self, seqs: list[Sequence], contexts: list[str] | None = None) -> list[dict[str, float]]: ...


# (sequence, its new gates, whether the top adapter switched, seconds per decision)
OnRoute = Callable[[Sequence, dict[str, float], bool, float], None]


class RouteStep:
    """Routes the rows that are due, on the engine thread; owns the side thread's early passes."""

    def __init__(self, source: GateSource | None, on_route: OnRoute | None = None) -> None:
        self.source, self.on_route = source, on_route
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="switchboard-router")
        self._prefetched: dict[int, tuple[Future, int]] = {}  # seq id -> (early pass, its row in it)

    def embeds_hidden(self, seq: Sequence) -> bool:
        """Whether `seq` is routed on the resident model's hidden states (the `base` embedder),
        which the engine then keeps for its routing window."""
        return seq.routing.mode == "auto" and self.source is not None and self.source.needs_hidden(seq)

    def route(self, seqs: list[Sequence]) -> dict[int, Exception]:
        """Recompute gates for `seqs` (auto-routed rows that are due), taking the results of
        re-routes started a step early where there are some. Returns {seq id: error} for the
        rows that fail alone."""
        source = self.source
        if not seqs or source is None:
            return {}
        now = [s for s in seqs if s.id not in self._prefetched]
        for seq in seqs:
            if seq.id in self._prefetched:
                future, i = self._prefetched.pop(seq.id)
                try:
                    proposals, elapsed = future.result()
                    self._apply(seq, proposals[i], elapsed)
                except Exception:  # the early pass failed: route this row now instead
                    now.append(seq)
        if not now:
            return {}
        try:
            proposals, elapsed = _timed_route(source, now, None)
            for seq, weights in zip(now, proposals, strict=True):
                self._apply(seq, weights, elapsed)
            return {}
        except Exception as e:
            if len(now) == 1:
                return {now[0].id: e}
        failed: dict[int, Exception] = {}
        for seq in now:
            try:
                proposals, elapsed = _timed_route(source, [seq], None)
                self._apply(seq, proposals[0], elapsed)
            except Exception as one:
                failed[seq.id] = one
        return failed

    def _apply(self, seq: Sequence, weights: dict[str, float], elapsed: float) -> None:
        switched = seq.route.apply(weights)
        if self.on_route:
            self.on_route(seq, weights, switched, elapsed)

    def prefetch(self, running: list[Sequence]) -> None:
        """Start, on the side thread, the text-encoder re-routes that fall due at the next step."""
        source = self.source
        if source is None:
            return
        upcoming = [s for s in running if is_due(s, ahead=1)
                    and s.id not in self._prefetched and not source.needs_hidden(s)]
        if upcoming:
            try:
                contexts = source.contexts(upcoming)  # snapshot now: the engine thread appends tokens
            except Exception:  # not fatal: these rows are routed on the engine thread when due
                return
            future = self._pool.submit(_timed_route, source, upcoming, contexts)
            for i, seq in enumerate(upcoming):
                self._prefetched[seq.id] = (future, i)

    def forget(self, seq: Sequence) -> None:
        """`seq` left the engine: drop its early pass, if any."""
        self._prefetched.pop(seq.id, None)


def is_due(seq: Sequence, ahead: int = 0) -> bool:
    """Whether an auto-routed `seq` is re-routed before its next token (`ahead=1`: the one after)."""
    return seq.routing.mode == "auto" and reroute_due(len(seq.generated) + ahead, seq.routing.reroute_every)


def _timed_route(source: GateSource, seqs: list[Sequence],
                 contexts: list[str] | None) -> tuple[list[dict[str, float]], float]:
    """Route `seqs`; returns the weights and the seconds per decision (for the latency metric)."""
    start = time.perf_counter()
    proposals = source.route(seqs, contexts)
    return proposals, (time.perf_counter() - start) / len(seqs)
