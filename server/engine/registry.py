"""The adapter registry: which name means which validated weights, separate from compute slots.

As in vLLM, registering an adapter and making it resident are two things: the registry maps a
name to an immutable `AdapterVersion`; the engine's `SlotManager` decides which versions occupy
the K compute slots. A request takes references on the versions it starts with, so replacing a
name is atomic for new requests while in-flight ones finish on their own version, and removing
a name never frees weights under a running request.

The registry also owns the host tier (`host_tier.HostTier`): which versions hold their factors
in host memory. A version leaves it when the budget needs room and no request holds it, or as
soon as it is replaced or removed and idle.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from server.engine.adapter_weights import AdapterWeights
from server.engine.errors import AdapterNotFound
from server.engine.host_tier import HostTier

_version_counter = itertools.count(1)


@dataclass(eq=False)
class AdapterVersion:
    weights: AdapterWeights
    version: int = field(default_factory=lambda: next(_version_counter))
    pinned: bool = False
    created: float = field(default_factory=time.time)
    refcount: int = 0  # guarded by the registry's lock
    retired: bool = False  # replaced or removed: free its slot once refcount drops to zero
    # Arrow's prototype per module path (router_core.arrow), so any adapter is routable per token
    # without examples. Computed once per version, by the engine thread on the first step that
    # routes a row by Arrow over it (`SlotManager.ensure_prototypes`), not at registration: most
    # adapters are never routed by Arrow, and it was ~half of a registration (docs/performance.md).
    # None until then.
    prototypes: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return self.weights.name


class AdapterRegistry:
    def __init__(self, host: HostTier | None = None) -> None:
        self._lock = threading.Condition()
        self._current: dict[str, AdapterVersion] = {}
        self.host = host if host is not None else HostTier()

    # -- registration ---------------------------------------------------------------------------
    def register(self, weights: AdapterWeights, pinned: bool = False) -> tuple[AdapterVersion, AdapterVersion | None]:
        """Install `weights` under its name; returns (new version, the version it replaced).
        Factors already read go into the host tier first (a pinned version that does not fit is
        refused there, before anything changes)."""
        new = AdapterVersion(weights=weights, pinned=pinned)
        self.host.admit(new)
        with self._lock:
            old = self._current.get(weights.name)
            self._current[weights.name] = new
            if old is not None:
                old.retired = True
            self._lock.notify_all()
        if old is not None and old.refcount == 0:
            self.host.drop(old)
        return new, old

    def register_many(self, items: list[tuple[AdapterWeights, bool]]) -> list[AdapterVersion | None]:
        """Register many (weights, pinned) under one lock (the start-up index); returns the
        versions they replaced."""
        olds = []
        with self._lock:
            for weights, pinned in items:
                new = AdapterVersion(weights=weights, pinned=pinned)
                old = self._current.get(weights.name)
                self._current[weights.name] = new
                if old is not None:
                    old.retired = True
                olds.append(old)
            self._lock.notify_all()
        for old in olds:
            if old is not None and old.refcount == 0:
                self.host.drop(old)
        return olds

    def remove(self, name: str) -> AdapterVersion:
        with self._lock:
            version = self._current.pop(name, None)
            if version is None:
                raise AdapterNotFound(f"adapter {name!r} is not loaded", param="name")
            version.retired = True
            self._lock.notify_all()
        if version.refcount == 0:
            self.host.drop(version)
        return version

    def restore(self, version: AdapterVersion) -> None:
        """Undo a `remove` (used when an unload is refused after all)."""
        with self._lock:
            if version.name not in self._current:
                version.retired = False
                self._current[version.name] = version

    # -- lookup ----------------------------------------------------------------------------------
    def get(self, name: str) -> AdapterVersion:
        with self._lock:
            version = self._current.get(name)
        if version is None:
            raise AdapterNotFound(f"The model `{name}` does not exist.", param="model")
        return version

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._current

    def count(self) -> int:
        with self._lock:
            return len(self._current)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    def snapshot(self) -> dict[str, AdapterVersion]:
        with self._lock:
            return dict(self._current)

    # -- references held by requests ---------------------------------------------------------------
    def acquire(self, names: list[str]) -> list[AdapterVersion]:
        """Take references on the current versions of `names`, all or none."""
        with self._lock:
            missing = [n for n in names if n not in self._current]
            if missing:
                raise AdapterNotFound(f"The model `{missing[0]}` does not exist.", param="model")
            versions = [self._current[n] for n in names]
            for v in versions:
                v.refcount += 1
            return versions

    def release(self, versions: list[AdapterVersion]) -> None:
        with self._lock:
            for v in versions:
                v.refcount -= 1
            idle = [v for v in versions if v.retired and v.refcount == 0]
            self._lock.notify_all()
        for v in idle:  # replaced or removed, and the last request on it ended: free its factors
            self.host.drop(v)

    def wait_idle(self, version: AdapterVersion, timeout: float) -> bool:
        """Block until no request holds `version` (call from a worker thread, not the event loop)."""
        with self._lock:
            return self._lock.wait_for(lambda: version.refcount == 0, timeout=timeout)
