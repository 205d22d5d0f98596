"""Adapter lifecycle for the API: validate from the store, register, replace, unload, rescan.

Reading and validating happens off the event loop and before the registry is touched, so a
refused adapter changes nothing. Every successful change is written to the store's manifest so
a restart brings the same set back.

At start the store is only indexed (`restore`): configs, metadata, safetensors headers and
centroids, not the factors, which the host tier reads on first use. The admin API still reads
and validates everything before it registers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from router_core.artifacts import centroids_bytes
from router_core.store_rules import CENTROID_FILE
from server.engine.adapter_weights import AdapterWeights, BaseSpec
from server.engine.errors import Conflict, InvalidAdapter, SwitchboardError
from server.engine.registry import AdapterRegistry, AdapterVersion
from server.metrics import Metrics
from server.store import durable
from server.store.folder import (
    check_name,
    file_in_store,
    index_adapter,
    read_adapter,
    read_centroids,
    resolve_in_store,
)
from server.store.manifest import Manifest

log = logging.getLogger(__name__)
DERIVED_DIR = "_names"  # <store>/_names/<name>/: data derived for a name that does not own its folder
SAVE = "save"  # a `prepare` hook's answer: what it computed must be saved, or the registration fails
SAVE_IF_POSSIBLE = "save_if_possible"  # a cache: a read-only store still serves the adapter


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
        self._centroid_of: dict[str, str | None] = {}  # name -> store path of its own derived centroid
        self._batch = 0  # > 0 during a reload: on_change runs once at its end
        self.record_task: asyncio.Task | None = None  # start-up: scanned folders written to the manifest

    # -- load / replace ---------------------------------------------------------------------------------
    async def load(self, name: str, path: str, *, pinned: bool = False, replace: bool = True,
                   prepare=None) -> tuple[AdapterVersion, AdapterVersion | None]:
        """Validate `path` (relative to the store) and register it as `name`.

        `prepare(weights)` may enrich the weights (centroids from examples) before registration and
        returns whether they must be saved (`SAVE`, `SAVE_IF_POSSIBLE` or None); if it fails,
        nothing is registered. Without one, `default_prepare` runs.
        """
        check_name(name)
        prepare = prepare or self.default_prepare
        folder = resolve_in_store(self.store, path)
        async with self._lock:
            if not replace and name in self.registry:
                raise Conflict(f"adapter {name!r} is already loaded; set load_inplace to replace it", param="lora_name")
            return await self._load_locked(name, folder, pinned, prepare, record=True)

    def derived_path(self, name: str, folder: Path) -> Path:
        """Where data the server derives for `name` (a centroid from posted examples) is saved: in
        the adapter's folder when the name owns it (`<store>/<name>`, what training writes), else
        beside the name, `<store>/_names/<name>/`, so registering an alias never rewrites the
        routing data of the adapter whose folder it borrows."""
        root = self.store.resolve()
        return folder / CENTROID_FILE if folder == root / name else root / DERIVED_DIR / name / CENTROID_FILE

    async def _load_locked(self, name: str, folder: Path, pinned: bool, prepare=None, *, record: bool,
                           centroid: str | None = None) -> tuple[AdapterVersion, AdapterVersion | None]:
        """The one validation and registration path (API, rescan and store watch). `record` writes the
        change to the manifest; the store watch applies the manifest and so never writes it.
        `centroid`: the store path of the name's own derived centroid (from the manifest).

        Files first, the registry last: every store write of the registration (a derived centroid,
        then the manifest record) is one all-or-nothing transaction, and only once it is durable is
        the adapter served, so a full disk (507) leaves the registry and the store as they were."""
        start = time.perf_counter()
        try:
            weights = await asyncio.to_thread(read_adapter, name, folder, self.spec, self.store)
            if centroid:
                await asyncio.to_thread(self._take_own_centroid, weights, centroid)
            persist = await prepare(weights) if prepare is not None else None
            writes: list[tuple[Path, bytes, bool]] = []
            if persist and weights.centroids is not None and weights.centroid_embedder:
                target = self.derived_path(name, folder)
                owned = target.parent == folder
                if persist == SAVE or (owned and not target.exists()) or (not owned and record):
                    writes.append((target, centroids_bytes(weights.centroids, weights.centroid_embedder, weights.example_form),
                                   persist == SAVE))
            if writes or record:
                rel = str(folder.relative_to(self.store.resolve()))
                centroid = await asyncio.to_thread(self._commit, name, rel, pinned, centroid, writes, record)
        except SwitchboardError:
            self.metrics.adapter_events.labels("fail").inc()
            raise
        new, old = self.registry.register(weights, pinned=pinned)
        self._centroid_of[name] = centroid
        self.metrics.adapter_load_seconds.observe(time.perf_counter() - start)
        self.metrics.adapter_events.labels("replace" if old else "load").inc()
        self._changed([name])
        return new, old

    def _commit(self, name: str, rel: str, pinned: bool, centroid: str | None,
                writes: list[tuple[Path, bytes, bool]], record: bool) -> str | None:
        """Stage every file, rename them, then record the manifest; any failure undoes the renames
        (`durable.Transaction`). A write that is only a cache (`required` False) may fail alone."""
        root = self.store.resolve()
        with durable.Transaction() as t:
            for target, data, required in writes:
                try:
                    t.stage(target, data)
                except OSError as e:
                    if required:
                        raise durable.failed(e, f"the centroid of {name!r}") from e
                    log.warning("adapter %s: could not save %s: %s", name, target.name, e)
                    continue
                if target.parent != root / rel:  # derived data beside the name: the manifest points at it
                    centroid = str(target.relative_to(root))
            try:
                t.commit()
            except OSError as e:
                raise durable.failed(e, f"the centroid of {name!r}") from e
            if record:
                self.manifest.set_adapter(name, rel, pinned, centroid)
        return centroid

    async def unload(self, name: str, *, wait: bool = True, timeout: float = 30.0) -> AdapterVersion:
        """Remove `name` for new requests; wait (bounded) for in-flight requests holding it,
        or, with `wait=False`, refuse with 409 while it is in use. The manifest is written first:
        if that fails (507) the adapter is put back and still served."""
        check_name(name, param="name")
        async with self._lock:
            version = self.registry.remove(name)
            if version.refcount and not wait:
                self.registry.restore(version)
                raise Conflict(f"adapter {name!r} is in use by {version.refcount} request(s)")
            try:
                await asyncio.to_thread(self.manifest.drop_adapter, name)
            except BaseException:
                self.registry.restore(version)
                raise
            self._centroid_of.pop(name, None)
            self.metrics.adapter_events.labels("unload").inc()
            self._changed([name])
        if version.refcount:
            await asyncio.to_thread(self.registry.wait_idle, version, timeout)
        if name not in self.registry:  # not loaded again meanwhile: its label series go too
            self.metrics.forget_adapter(name)
        return version

    # -- start-up --------------------------------------------------------------------------------------
    async def restore(self, scan_folders: bool) -> ReloadReport:
        """Index the manifest's adapters (and, with `scan_folders`, every adapter folder at the top
        of the store) without reading their factors, and register them in one go: the cost per
        adapter is a few small files, and routing is rebuilt once, not once per adapter.

        Folders found by the scan are recorded in the manifest afterwards (`record_task`), in the
        background, so the port opens without waiting for those writes.
        """
        report = ReloadReport()
        wanted = {name: entry["path"] for name, entry in self.manifest.adapters.items()}
        pinned = {name: entry["pinned"] for name, entry in self.manifest.adapters.items()}
        centroids = {name: entry.get("centroid") for name, entry in self.manifest.adapters.items()}
        if scan_folders:
            for name, error in self._scan_folders(wanted).items():
                report.failed[name] = error

        def index_all() -> list[tuple]:
            out = []
            for name, path in sorted(wanted.items()):
                try:
                    weights = index_adapter(name, resolve_in_store(self.store, path), self.spec, self.store)
                    own = centroids.get(name)
                    if own:
                        self._take_own_centroid(weights, own)
                    out.append((weights, pinned.get(name, False)))
                except SwitchboardError as e:
                    report.failed[name] = e.message
                except Exception as e:  # any other bad file is refused too: the index never aborts half-way
                    report.failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
            return out

        items = await asyncio.to_thread(index_all)
        if self.default_prepare is not None:
            for weights, _ in items:
                if await self.default_prepare(weights) == SAVE_IF_POSSIBLE:
                    await asyncio.to_thread(self._cache_centroid, weights)
        for name, error in report.failed.items():
            log.warning("store index: %s refused: %s", name, error)
        async with self._lock:
            olds = self.registry.register_many(items)
            for (weights, _), old in zip(items, olds, strict=True):
                self._centroid_of[weights.name] = centroids.get(weights.name)
                (report.replaced if old else report.loaded).append(weights.name)
                self.metrics.adapter_events.labels("replace" if old else "load").inc()
            self._changed(None)  # start-up: everything
        new = [(w.name, str(w.path.relative_to(self.store.resolve())), p) for w, p in items
               if w.name not in self.manifest.adapters]
        if new:
            self.record_task = asyncio.create_task(self._record(new))
        return report

    def _take_own_centroid(self, weights: AdapterWeights, rel: str) -> None:
        """Route `weights` by the name's own derived centroid file (store-relative `rel`), not the
        borrowed folder's: its centroids, embedder and examples' form group, when the file exists."""
        own, embedder, form = read_centroids(file_in_store(self.store / rel, self.store))
        if own is not None:
            weights.centroids, weights.centroid_embedder, weights.example_form = own, embedder, form

    def _cache_centroid(self, weights: AdapterWeights) -> None:
        """Save a centroid computed at start-up from an adapter's examples beside it, when the name
        owns its folder and there is no file yet, so the next start reads it instead of recomputing;
        a store that cannot take the write still serves and routes the adapter."""
        target = self.derived_path(weights.name, weights.path)
        if target.parent != weights.path or target.exists() or weights.centroids is None:
            return
        try:
            durable.write_file(target, centroids_bytes(weights.centroids, weights.centroid_embedder or "",
                                                       weights.example_form))
        except OSError as e:
            log.warning("adapter %s: centroid not saved (%s); the next start recomputes it", weights.name, e)

    async def _record(self, entries: list[tuple[str, str, bool]]) -> None:
        """Write folders the start-up scan registered into the manifest (one at a time, through its
        own locked update), skipping any that an admin change has replaced or removed meanwhile."""
        async with self._lock:
            for name, path, pinned in entries:
                version = self.registry.snapshot().get(name)
                if version is not None and version.weights.path.name == Path(path).name:
                    await asyncio.to_thread(self.manifest.set_adapter, name, path, pinned)
            await asyncio.to_thread(self.manifest.compact)  # the journal folded into _manifest.json, as after a reload

    def _scan_folders(self, wanted: dict[str, str]) -> dict[str, str]:
        """Add every adapter folder at the top of the store to `wanted`; returns the entries the file
        system could not stat. One directory listing and one stat per folder (os-level calls:
        this runs over every folder of the store at each reload)."""
        failed = {}
        try:
            entries = sorted(os.scandir(self.store), key=lambda e: e.name) if self.store.is_dir() else []
        except OSError:
            entries = []
        for entry in entries:
            try:
                if entry.is_dir() and not entry.name.startswith((".", "_")) \
                        and os.path.exists(os.path.join(entry.path, "adapter_config.json")):
                    wanted.setdefault(entry.name, entry.name)
            except OSError as e:  # an entry the file system cannot stat: report it, scan the rest
                failed[entry.name] = f"cannot be read: {type(e).__name__}"
        return failed

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
        centroids = {name: entry.get("centroid") for name, entry in self.manifest.adapters.items()}
        if scan_folders:
            report.failed.update(self._scan_folders(wanted))
        current = self.registry.snapshot()
        root = self.store.resolve()
        self._batch += 1  # the routers are rebuilt once at the end, not once per adapter
        try:
            for name, path in sorted(wanted.items()):
                try:
                    check_name(name)
                    have = current.get(name)
                    folder = _same_folder(root, path, have.weights.path) if have is not None else None
                    folder = folder or resolve_in_store(self.store, path)
                    if have is not None and have.weights.path == folder and _mtime(folder) <= have.created:
                        report.unchanged.append(name)  # nothing read, written or rebuilt
                        continue
                    async with self._lock:
                        _, old = await self._load_locked(name, folder, pinned.get(name, False), self.default_prepare,
                                                         record=True, centroid=centroids.get(name))
                    (report.replaced if old else report.loaded).append(name)
                except SwitchboardError as e:
                    report.failed[name] = e.message
                    log.warning("store scan: %s refused: %s", name, e.message)
                except Exception as e:  # any other bad file is refused too: a scan never aborts half-way
                    report.failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
                    log.warning("store scan: %s refused", name, exc_info=True)
        finally:
            self._batch -= 1
            if report.loaded or report.replaced:
                self._changed(report.loaded + report.replaced)
        if report.loaded or report.replaced:  # a bulk change: its records folded into the snapshot
            await asyncio.to_thread(self.manifest.compact)
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
                self._centroid_of.pop(name, None)
                self.metrics.adapter_events.labels("unload").inc()
                report.removed.append(name)
                removed.append(version)
            if removed:
                self._changed(report.removed)
            for name, entry in sorted(wanted.items()):
                path, pinned, centroid = entry["path"], entry["pinned"], entry.get("centroid")
                try:
                    folder = resolve_in_store(self.store, path)
                    mtime = _mtime(folder)
                except (SwitchboardError, OSError) as e:
                    self._refuse(report, name, (path, None), getattr(e, "message", str(e)))
                    continue
                have = current.get(name)
                if have is not None and have.weights.path == folder and have.pinned == pinned and mtime <= have.created \
                        and centroid == self._centroid_of.get(name):
                    report.unchanged.append(name)
                    self._refused.pop(name, None)
                    continue
                if self._refused.get(name) == (path, mtime):
                    continue  # refused as it is now: wait for the folder or the manifest to change
                try:
                    _, old = await self._load_locked(name, folder, pinned, self.default_prepare, record=False,
                                                     centroid=centroid)
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

    def _changed(self, names: list[str] | None) -> None:
        """Tell the callbacks (routing) which names changed (None: any of them may have), so they
        rebuild only those."""
        if self._batch:
            return
        self.metrics.adapters_loaded.set(self.registry.count())
        for callback in self.on_change:
            callback(names)


def _same_folder(root: Path, path: str, registered: Path) -> Path | None:
    """`registered` when the manifest's `path` (one name at the top of the store) still names
    that folder itself, not a symlink: one lstat instead of resolving the path again at every
    reload. None: resolve it (`resolve_in_store` checks it stays inside the store)."""
    if "/" in path or os.sep in path or path in (".", "..") or root / path != registered:
        return None
    try:
        return registered if stat.S_ISDIR(os.lstat(registered).st_mode) else None
    except (OSError, ValueError):
        return None


def _mtime(folder: Path) -> float:
    """Newest modification time of the folder's entries (their own, not a link target's: a
    dangling symlink must not abort the scan)."""
    try:
        with os.scandir(folder) as entries:
            return max(e.stat(follow_symlinks=False).st_mtime for e in entries)
    except ValueError:
        raise InvalidAdapter(f"{folder.name} is empty") from None
    except OSError as e:
        raise InvalidAdapter(f"{folder.name} cannot be read: {type(e).__name__}") from None
