"""The host tier: which registered adapters hold their factors in host memory, within a budget.

S-LoRA and LoRAX keep a tiered adapter cache (device slots → host memory → disk); this is the
host → disk half (the slots are `SlotManager`). Registering thousands of adapters costs only
their descriptions; the factors are read from the store when a request first needs them and
stay in host memory, least recently used first out, while the budget (`max_adapters` and
`max_bytes`) holds. An adapter whose weights have no `loader` (built in code) is never evicted.

What may leave: versions no request holds (`refcount == 0`) and not pinned, so a running
request's factors are never dropped under it and pinned adapters never leave. When nothing can
leave, the new load is refused with `Unavailable` (503): that request fails alone, everything
already held keeps serving. Dropping a version's tensors frees them once the last reader lets go
(a slot's copy on CPU may alias them: at most `max_loras` adapters outside the budget).

Thread-safe: the event loop, request threads and the engine thread all call it. Reading a file
happens outside the lock, so one slow read never blocks lookups of adapters already loaded.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from typing import Protocol

from server.engine.adapter_weights import AdapterWeights, Factors
from server.engine.errors import InvalidAdapter, SwitchboardError, Unavailable

log = logging.getLogger(__name__)


class AdapterVersion(Protocol):
    """What the host tier reads of `registry.AdapterVersion` (the registry owns the tier, so the
    tier does not import it)."""

    weights: AdapterWeights
    version: int
    pinned: bool
    refcount: int
    retired: bool

    @property
    def name(self) -> str: ...


class HostTier:
    def __init__(self, max_adapters: int = 0, max_bytes: int = 0) -> None:
        """`max_adapters` / `max_bytes`: limits on the adapters whose factors are in host memory
        (0 = no limit)."""
        self.max_adapters, self.max_bytes = max_adapters, max_bytes
        self._lock = threading.Lock()
        self._held: OrderedDict[int, AdapterVersion] = OrderedDict()  # version number -> version, LRU first
        self._sizes: dict[int, int] = {}  # version number -> bytes accounted for it
        self.bytes = 0
        self.loads = 0  # reads from disk (metrics, tests)
        self.evictions = 0
        self.oom_releases = 0  # times the OS refused memory and idle adapters were sent back to disk

    def __len__(self) -> int:
        return len(self._held)

    def holds(self, version: AdapterVersion) -> bool:
        return version.weights.tensors is not None

    # -- lookups -------------------------------------------------------------------------------------
    def tensors(self, version: AdapterVersion) -> Factors:
        """The version's factors, read from disk if they are not in host memory (and accounted)."""
        w = version.weights
        with self._lock:
            held = w.tensors
            if held is not None:
                if version.version in self._held:
                    self._held.move_to_end(version.version)
                return held
        if w.loader is None:
            raise InvalidAdapter(f"adapter {w.name!r} has no factors in memory and no file to read them from")
        self._check_room(version)  # refuse before reading when nothing could make room
        try:
            factors = w.loader()
        except SwitchboardError:
            raise
        except MemoryError:
            # the OS refused memory (a container or ulimit below the budget): send every idle,
            # unpinned adapter back to disk and read once more; if that fails too, refuse this one
            freed = self.release_idle()
            log.warning("the OS refused memory while reading adapter %s; sent %d idle adapters back to disk and "
                        "read it again", w.name, freed)
            try:
                factors = w.loader()
            except MemoryError as e:
                raise Unavailable(
                    f"not enough host memory to load adapter {w.name!r}: the OS refused it ({str(e)[:120]}) with "
                    f"{len(self._held)} adapters ({self.bytes >> 20} MiB) held by running requests or pinned "
                    f"after sending {freed} idle ones back to disk; retry later, or lower --max-cpu-adapter-mb "
                    "below the memory limit") from None
        with self._lock:
            if w.tensors is not None:  # another thread loaded it meanwhile: keep that one
                return w.tensors
            self._make_room(version, _size(factors))
            w.tensors = factors
            self._add(version, _size(factors))
            self.loads += 1
            return factors

    def admit(self, version: AdapterVersion) -> None:
        """Account for a version registered with its factors already read (the admin API reads and
        validates them before registering). If they do not fit, an unpinned version goes back to
        disk (its next request reads it again); a pinned one is refused with `Unavailable`."""
        w = version.weights
        if w.tensors is None or w.loader is None:
            return
        size = _size(w.tensors)
        with self._lock:
            if version.version in self._held:
                return
            try:
                self._make_room(version, size)
            except Unavailable:
                if version.pinned:
                    raise
                w.drop_factors()
                return
            self._add(version, size)

    def release_idle(self) -> int:
        """Send every idle, unpinned adapter back to disk (the OS is out of memory); returns how many."""
        with self._lock:
            idle = [v.version for v in self._evictable()]
            for number in idle:
                self._evict(number)
            self.oom_releases += 1
        gc.collect()  # factors caught in reference cycles go now, not at the next collection
        return len(idle)

    def drop(self, version: AdapterVersion) -> None:
        """Forget a version (replaced or removed and no longer held by any request)."""
        with self._lock:
            self._evict(version.version)

    def state(self, version: AdapterVersion) -> str:
        """`host` (factors in memory) or `disk` (read on first use)."""
        return "host" if version.weights.tensors is not None else "disk"

    # -- budget --------------------------------------------------------------------------------------
    def _fits(self, extra_adapters: int, extra_bytes: int) -> bool:
        return ((not self.max_adapters or len(self._held) + extra_adapters <= self.max_adapters)
                and (not self.max_bytes or self.bytes + extra_bytes <= self.max_bytes))

    def _evictable(self) -> list[AdapterVersion]:
        """Versions that may leave host memory, least recently used first."""
        return [v for v in self._held.values() if v.refcount == 0 and not v.pinned]

    def _check_room(self, version: AdapterVersion) -> None:
        with self._lock:
            size = version.weights.factor_bytes
            freeable = self._evictable()
            if not self._fits(1 - len(freeable), size - sum(self._size_of(v) for v in freeable)):
                raise self._full(version.name)

    def _make_room(self, version: AdapterVersion, size: int) -> None:
        """Evict idle, unpinned versions (retired ones first, then LRU) until `size` more bytes
        and one more adapter fit; `Unavailable` if they cannot (nothing is evicted then)."""
        if self.max_bytes and size > self.max_bytes:
            raise Unavailable(f"adapter {version.name!r} needs {size >> 20} MiB of host memory, more than the "
                              f"whole budget ({self.max_bytes >> 20} MiB, --max-cpu-adapter-mb)")
        if self._fits(1, size):
            return  # room already: no pass over the held versions (a register stays O(1) in N)
        victims: list[AdapterVersion] = []
        freed_bytes = 0
        candidates = sorted(self._evictable(), key=lambda v: not v.retired)  # stable: LRU order kept
        for v in candidates:
            if self._fits(1 - len(victims), size - freed_bytes):
                break
            victims.append(v)
            freed_bytes += self._size_of(v)
        if not self._fits(1 - len(victims), size - freed_bytes):
            raise self._full(version.name)
        for v in victims:
            self._evict(v.version)

    def _full(self, name: str) -> Unavailable:
        return Unavailable(
            f"host memory for adapters is full: {len(self._held)} adapters ({self.bytes >> 20} MiB) are in use by "
            f"running requests or pinned, so {name!r} cannot be loaded now (budget: --max-cpu-adapters "
            f"{self.max_adapters or 'unlimited'}, --max-cpu-adapter-mb "
            f"{(self.max_bytes >> 20) if self.max_bytes else 'unlimited'}); retry later")

    def _add(self, version: AdapterVersion, size: int) -> None:
        self._held[version.version] = version
        self._sizes[version.version] = size
        self.bytes += size

    def _size_of(self, version: AdapterVersion) -> int:
        return self._sizes.get(version.version, 0)

    def _evict(self, number: int) -> None:
        version = self._held.pop(number, None)
        if version is None:
            return
        self.bytes -= self._sizes.pop(number, 0)
        if version.weights.loader is not None:
            version.weights.drop_factors()
        self.evictions += 1



def _size(factors: Factors) -> int:
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in factors.values())
