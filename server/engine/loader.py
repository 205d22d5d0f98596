"""Reading adapters' factors from disk off the engine thread, for rows the router sends to them.

A request that names its adapters reads their factors on its own side before it is submitted
(`completion_service.build_choices`). Under `model: "auto"` the engine only learns which
adapters a row uses when it routes the row, on its own thread; reading a lazily indexed adapter
there (milliseconds to seconds on a busy disk) would stall every other row's step. Instead the
engine asks this loader: the read runs on a side thread (`HostTier.tensors`, which is
thread-safe and reads outside its lock) while the engine keeps stepping the other rows, and
the row waits (a new row outside the batch, a re-routed row on the mixture it had) until its
factors are in host memory.

Only the engine thread calls `FactorLoader`; the futures it keeps are its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Protocol

from server.engine.errors import SwitchboardError
from server.engine.host_tier import AdapterVersion, HostTier
from server.engine.sequence import Sequence
from server.engine.tokens import row_error

LOAD_THREADS = 2  # concurrent reads: one slow file does not hold up the next adapter's read


class Slots(Protocol):
    def slot_of(self, version) -> int | None: ...


class FactorLoader:
    def __init__(self, host: HostTier, slots: Slots, threads: int = LOAD_THREADS) -> None:
        self.host, self.slots = host, slots
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="switchboard-loader")
        self._reads: dict[int, Future] = {}  # version number -> its read in flight (or done, not yet collected)
        self.started = 0  # reads started (tests, metrics)

    def missing(self, versions: list[AdapterVersion]) -> list[AdapterVersion]:
        """The versions among `versions` whose factors are neither in host memory nor in a slot."""
        return [v for v in versions if not self.host.holds(v) and self.slots.slot_of(v) is None]

    def check(self, versions: list[AdapterVersion]) -> bool:
        """True when every version of `versions` can be installed without reading a file; else
        start (once) the reads still needed and return False. A read that failed raises its
        error here (the engine fails the row that needed it, alone)."""
        ready = True
        for v in self.missing(versions):
            future = self._reads.get(v.version)
            if future is None:
                self._reads[v.version] = self._pool.submit(self.host.tensors, v)
                self.started += 1
                ready = False
            elif future.done():
                del self._reads[v.version]
                error = future.exception()
                if error is not None:
                    raise error
                if self.missing([v]):  # read, then evicted before it was used: read it again
                    self._reads[v.version] = self._pool.submit(self.host.tensors, v)
                    self.started += 1
                    ready = False
            else:
                ready = False
        return ready

    def pending(self) -> bool:
        return any(not f.done() for f in self._reads.values())

    def prune(self) -> None:
        """Forget finished reads no row collected (the row that wanted it left meanwhile), so a
        stale failure is never raised for a later row: that row reads again."""
        for number in [n for n, f in self._reads.items() if f.done()]:
            del self._reads[number]

    def wait(self, timeout: float) -> None:
        """Block up to `timeout` seconds for one read to finish (an engine with nothing else to do)."""
        if self._reads:
            wait(list(self._reads.values()), timeout=timeout, return_when=FIRST_COMPLETED)


def _versions(seq: Sequence, gates: dict[str, float]) -> list[AdapterVersion]:
    return [seq.versions[name] for name, w in gates.items() if w != 0.0]


class ParkedRows:
    """The rows that wait outside the batch for their adapters' factors, in arrival order, and
    the decisions of running rows that wait for theirs. `end` ends a row with its error (the
    engine's `_end`): a failed read fails the row that needed it, alone."""

    def __init__(self, loader: FactorLoader, end: Callable[[Sequence, SwitchboardError | None], None]) -> None:
        self.loader, self._end = loader, end
        self._rows: list[Sequence] = []

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(list(self._rows))

    def __contains__(self, seq: object) -> bool:
        return seq in self._rows

    def remove(self, seq: Sequence) -> None:
        self._rows.remove(seq)

    def clear(self) -> None:
        self._rows.clear()

    def ready(self, seqs: list[Sequence]) -> list[Sequence]:
        """The rows of `seqs` whose adapters can be installed now; the others are parked (their
        reads started on the loader's thread), keeping their routing decision."""
        ready = []
        for seq in seqs:
            try:
                if self.loader.check(_versions(seq, seq.route.gates)):
                    ready.append(seq)
                else:
                    self._rows.append(seq)
            except Exception as e:
                self._end(seq, row_error(e, "reading an adapter"))
        return ready

    def released(self) -> list[Sequence]:
        """The parked rows whose reads finished, in their order, no longer parked."""
        back = []
        for seq in list(self._rows):
            try:
                ready = self.loader.check(_versions(seq, seq.route.gates))
            except Exception as e:
                self._rows.remove(seq)
                self._end(seq, row_error(e, "reading an adapter"))
                continue
            if ready:
                self._rows.remove(seq)
                back.append(seq)
        return back

    def hold(self, running: list[Sequence], before: dict[int, dict[str, float]]) -> None:
        """A running row re-routed (`before`: its gates until now) to an adapter still on disk keeps
        those gates while the loader reads it (`route.pending`); a pending decision whose reads
        finished takes effect now."""
        for seq in running:
            try:
                if seq.id in before:
                    if self.loader.check(_versions(seq, seq.route.gates)):
                        seq.route.pending = None
                    else:
                        seq.route.pending, seq.route.gates = seq.route.gates, before[seq.id]
                elif seq.route.pending is not None and self.loader.check(_versions(seq, seq.route.pending)):
                    seq.route.gates, seq.route.pending = seq.route.pending, None
            except Exception as e:
                self._end(seq, row_error(e, "reading an adapter"))
