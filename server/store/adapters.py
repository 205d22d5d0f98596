"""Adapter lifecycle for the API: validate from the store, register, replace, unload, rescan.

Reading and validating happens off the event loop and before the registry is touched, so a
refused adapter changes nothing. Every successful change is written to the store's manifest so
a restart brings the same set back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.engine.adapter_weights import BaseSpec
from server.engine.errors import Conflict, InvalidAdapter, SwitchboardError
from server.engine.registry import AdapterRegistry, AdapterVersion
from server.metrics import Metrics
from server.store.folder import check_name, read_adapter, resolve_in_store
from server.store.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)


class AdapterService:
    def __init__(self, store: Path, spec: BaseSpec, registry: AdapterRegistry, metrics: Metrics,
                 manifest: Manifest) -> None:
        self.store, self.spec, self.registry, self.metrics = store, spec, registry, metrics
        self.manifest = manifest
        self._lock = asyncio.Lock()  # one admin change at a time; requests never wait on it
        self.on_change: list = []  # callbacks (e.g. the routing service rebuilding its centroids)
        # used when a load brings no `prepare` of its own: the app fills in centroids from examples.jsonl
        self.default_prepare = None
        self._refused: dict[str, tuple[str, float | None]] = {}  # store watch: name -> (path, mtime) refused

    # -- load / replace ---------------------------------------------------------------------------
    async def load(self, name: str, path: str, *, pinned: bool = False, replace: bool = True,
                   prepare=None) -> tuple[AdapterVersion, AdapterVersion | None]:
        """Validate `path` (relative to the store) and register it as `name`.

        `prepare(weights)` may enrich the weights (centroids from examples) before registration;
        if it fails, nothing is registered. Without one, `default_prepare` runs.
        """
        check_name(name)
        prepare = prepare or self.default_prepare
        folder = resolve_in_store(self.store, path)
        async with self._lock:
            if not replace and name in self.registry:
                raise Conflict(f"adapter {name!r} is already loaded; set load_inplace to replace it", param="lora_name")
            return await self._load_locked(name, folder, pinned, prepare, record=True)

    async def _load_locked(self, name: str, folder: Path, pinned: bool, prepare=None, *,
                           record: bool) -> tuple[AdapterVersion, AdapterVersion | None]:
        """The one validation and registration path (API, rescan and store watch). `record` writes the
        change to the manifest; the store watch applies the manifest and so never writes it."""
        start = time.perf_counter()
        try:
            weights = await asyncio.to_thread(read_adapter, name, folder, self.spec, self.store)
            if prepare is not None:
                await prepare(weights)
        except SwitchboardError:
            self.metrics.adapter_events.labels("fail").inc()
            raise
        new, old = self.registry.register(weights, pinned=pinned)
        self.metrics.adapter_load_seconds.observe(time.perf_counter() - start)
        self.metrics.adapter_events.labels("replace" if old else "load").inc()
        if record:
            self.manifest.set_adapter(name, str(folder.relative_to(self.store.resolve())), pinned)
        self._changed()
        return new, old

    async def unload(self, name: str, *, wait: bool = True, timeout: float = 30.0) -> AdapterVersion:
        """Remove `name` for new requests; wait (bounded) for in-flight requests holding it,
        or, with `wait=False`, refuse with 409 while it is in use."""
        check_name(name, param="name")
        async with self._lock:
            version = self.registry.remove(name)
            if version.refcount and not wait:
                self.registry.restore(version)
                raise Conflict(f"adapter {name!r} is in use by {version.refcount} request(s)")
            self.metrics.adapter_events.labels("unload").inc()
            self.manifest.drop_adapter(name)
            self._changed()
        if version.refcount:
            await asyncio.to_thread(self.registry.wait_idle, version, timeout)
        if name not in self.registry:  # not loaded again meanwhile: its label series go too
            self.metrics.forget_adapter(name)
        return version

    # -- store scan ------------------------------------------------------------------------------------
    async def reload(self, scan_folders: bool = True) -> ReloadReport:
        """Register the manifest's adapters and (with `scan_folders`) every adapter folder at the
        top of the store; replace changed ones; report refused ones without raising.

        At start-up a store with a manifest restores exactly the manifest (an adapter unloaded
        through the API stays unloaded); `POST /admin/reload` also picks up new folders.
        """
        report = ReloadReport()
        wanted = {name: entry["path"] for name, entry in self.manifest.adapters.items()}
        pinned = {name: entry["pinned"] for name, entry in self.manifest.adapters.items()}
        if scan_folders:
            for entry in _entries(self.store):
                try:
                    if entry.is_dir() and not entry.name.startswith((".", "_")) \
                            and (entry / "adapter_config.json").exists():
                        wanted.setdefault(entry.name, entry.name)
                except OSError as e:  # an entry the file system cannot stat: report it, scan the rest
                    report.failed[entry.name] = f"cannot be read: {type(e).__name__}"
        current = self.registry.snapshot()
        for name, path in sorted(wanted.items()):
            try:
                folder = resolve_in_store(self.store, path)
                if name in current and current[name].weights.path == folder and _mtime(folder) <= current[name].created:
                    report.unchanged.append(name)
                    continue
                _, old = await self.load(name, path, pinned=pinned.get(name, False))
                (report.replaced if old else report.loaded).append(name)
            except SwitchboardError as e:
                report.failed[name] = e.message
                log.warning("store scan: %s refused: %s", name, e.message)
            except Exception as e:  # any other bad file is refused too: a scan never aborts half-way
                report.failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
                log.warning("store scan: %s refused", name, exc_info=True)
        return report

    # -- store watch -----------------------------------------------------------------------------------
    async def converge(self) -> tuple[ReloadReport, list[AdapterVersion]]:
        """Make the registry what the store's manifest says: register the names it added, replace
        the ones whose path, pin or folder changed, remove the ones it dropped.

        This is the store watch's half of the admin API, through the same validation path: a
        refused folder leaves the registry as it was (and is retried once its folder changes);
        removed versions stay with the requests that hold them, exactly as after DELETE. The
        manifest is read, never written: writing it is the admin API's job. Returns the report and
        the removed versions (the caller may wait for them to drain).
        """
        report, removed = ReloadReport(), list[AdapterVersion]()
        async with self._lock:
            if not self.manifest.refresh():
                return report, removed  # no readable manifest: nothing to converge on (never "remove all")
            wanted = dict(self.manifest.adapters)
            current = self.registry.snapshot()
            for name in sorted(set(current) - set(wanted)):
                version = self.registry.remove(name)
                self.metrics.adapter_events.labels("unload").inc()
                report.removed.append(name)
                removed.append(version)
            if removed:
                self._changed()
            for name, entry in sorted(wanted.items()):
                path, pinned = entry["path"], entry["pinned"]
                try:
                    folder = resolve_in_store(self.store, path)
                    mtime = _mtime(folder)
                except (SwitchboardError, OSError) as e:
                    self._refuse(report, name, (path, None), getattr(e, "message", str(e)))
                    continue
                have = current.get(name)
                if have is not None and have.weights.path == folder and have.pinned == pinned and mtime <= have.created:
                    report.unchanged.append(name)
                    self._refused.pop(name, None)
                    continue
                if self._refused.get(name) == (path, mtime):
                    continue  # refused as it is now: wait for the folder or the manifest to change
                try:
                    _, old = await self._load_locked(name, folder, pinned, self.default_prepare, record=False)
                except SwitchboardError as e:
                    self._refuse(report, name, (path, mtime), e.message)
                    continue
                except Exception as e:  # any other bad file is refused too, as in a rescan
                    self._refuse(report, name, (path, mtime), f"{type(e).__name__}: {str(e)[:200]}")
                    continue
                (report.replaced if old else report.loaded).append(name)
                self._refused.pop(name, None)
        return report, removed

    def _refuse(self, report: ReloadReport, name: str, state: tuple[str, float | None], error: str) -> None:
        """Report a refusal once per state of the folder, not at every poll."""
        if self._refused.get(name) != state:
            report.failed[name] = error
            log.warning("store watch: %s refused: %s", name, error)
        self._refused[name] = state

    def _changed(self) -> None:
        self.metrics.adapters_loaded.set(len(self.registry.names()))
        for callback in self.on_change:
            callback()


def _entries(store: Path) -> list[Path]:
    try:
        return sorted(store.iterdir()) if store.is_dir() else []
    except OSError:
        return []


def _mtime(folder: Path) -> float:
    """Newest modification time of the folder's entries (their own, not a link target's: a
    dangling symlink must not abort the scan)."""
    try:
        return max(p.lstat().st_mtime for p in folder.iterdir())
    except ValueError:
        raise InvalidAdapter(f"{folder.name} is empty") from None
    except OSError as e:
        raise InvalidAdapter(f"{folder.name} cannot be read: {type(e).__name__}") from None
