"""Compute slots: which adapter versions are resident in the multi-LoRA layers right now.

Owned by the engine thread alone. At most `num_slots` versions are resident; when a step needs
one that is not, the least recently used slot that this step does not need (and whose adapter
is not pinned) is given to it. Retired versions (replaced or removed) leave their slot as soon
as no request holds them.

Versions are told apart by `AdapterVersion.version`, a number the registry never reuses, not by
`id()`: an id can be reused by a new object once the old one is freed.
"""

from __future__ import annotations

import time

import torch

from router_core.arrow import prototypes
from server.engine.errors import Unavailable
from server.engine.host_tier import HostTier
from server.engine.lora_layer import MultiLoRAConv1D
from server.engine.registry import AdapterVersion


class SlotManager:
    def __init__(self, layers: dict[str, MultiLoRAConv1D], num_slots: int,
                 device: torch.device, dtype: torch.dtype, host: HostTier | None = None) -> None:
        self.layers = layers
        self.host = host if host is not None else HostTier()  # where a version's factors come from (read from disk if evicted)
        self.num_slots = num_slots
        self.device, self.dtype = device, dtype
        self.slot_version: list[AdapterVersion | None] = [None] * num_slots
        self.has_protos: list[bool] = [False] * num_slots  # the layers hold the slot's Arrow prototypes
        self.last_used: list[float] = [0.0] * num_slots
        self.loads = 0  # installs into a slot, for tests and metrics
        # per slot, changed by every install and eviction: keys caches of what is in the slots
        self.epoch: list[int] = [0] * num_slots
        self._epochs = 0

    def slot_of(self, version: AdapterVersion) -> int | None:
        for i, v in enumerate(self.slot_version):
            if v is not None and v.version == version.version:
                return i
        return None

    def rank_of(self, slot: int) -> int:
        version = self.slot_version[slot]
        assert version is not None, f"slot {slot} is empty"
        return version.weights.rank

    def _touch(self, slot: int) -> None:
        self._epochs += 1
        self.epoch[slot] = self._epochs

    def resident(self) -> list[AdapterVersion]:
        return [v for v in self.slot_version if v is not None]

    def ensure(self, versions: list[AdapterVersion]) -> list[int]:
        """Make every version resident; returns their slots in the same order."""
        needed = {v.version for v in versions}
        if len(needed) > self.num_slots:
            raise Unavailable(f"a step needs {len(needed)} adapters but only {self.num_slots} slots exist (max_loras)")
        slots = []
        now = time.monotonic()
        for version in versions:
            slot = self.slot_of(version)
            if slot is None:
                slot = self._free_slot(needed)
                self._install(slot, version)
            self.last_used[slot] = now
            slots.append(slot)
        return slots

    def _free_slot(self, needed: set[int]) -> int:
        for i, v in enumerate(self.slot_version):
            if v is None:
                return i
        candidates = [
            i for i, v in enumerate(self.slot_version)
            if v is not None and v.version not in needed and not v.pinned
        ]
        if not candidates:
            raise Unavailable("every adapter slot is in use by this step or pinned; raise max_loras")
        return min(candidates, key=lambda i: self.last_used[i])

    def _install(self, slot: int, version: AdapterVersion) -> None:
        cuda = self.device.type == "cuda"
        factors = self.host.tensors(version)  # read from disk if evicted; raises for this step's rows if it cannot be
        tensors = version.weights.staged(self.dtype, pin=cuda, factors=factors)  # pre-cast (and pinned on CUDA) once
        protos = version.prototypes  # None until a step routes a row by Arrow over it (ensure_prototypes)
        for path, layer in self.layers.items():
            pair = tensors.get(path)
            if pair is None:
                layer.set_slot(slot, None, None)
            else:
                a, b = pair
                proto = None if protos is None else protos.get(path)
                layer.set_slot(slot, a.to(self.device, non_blocking=cuda), b.to(self.device, non_blocking=cuda),
                               None if proto is None else proto.to(self.device, non_blocking=cuda))
        self.has_protos[slot] = protos is not None
        self.slot_version[slot] = version
        self.loads += 1
        self._touch(slot)

    def ensure_prototypes(self, active: tuple[int, ...]) -> None:
        """Give the layers Arrow's prototypes of the `active` slots that lack them (a step with
        rows routed per token calls this before its forward). A version's prototypes are computed
        once, from the factors its slot holds (`router_core.arrow.prototypes`), and kept on the
        version, so a later install of it in any slot reuses them; registering never pays for
        them. Engine thread only, like the slots themselves."""
        for slot in active:
            version = self.slot_version[slot]
            if version is None or self.has_protos[slot]:
                continue
            if version.prototypes is None:
                factors = {path: (a, b) for path, layer in self.layers.items()
                           if (a := layer.lora_a[slot]) is not None and (b := layer.lora_b[slot]) is not None}
                version.prototypes = prototypes(factors)
            for path, layer in self.layers.items():
                proto = version.prototypes.get(path)
                layer.set_proto(slot, None if proto is None else proto.to(self.device))
            self.has_protos[slot] = True

    def evict(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.set_slot(slot, None, None)
        self.has_protos[slot] = False
        self.slot_version[slot] = None
        self._touch(slot)

    def evict_retired(self) -> None:
        """Free slots of replaced/removed versions that no request holds any more."""
        for i, v in enumerate(self.slot_version):
            if v is not None and v.retired and v.refcount == 0:
                self.evict(i)
