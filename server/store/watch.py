"""`--watch-store SECONDS`: every server converges on the adapter store by itself.

The store and its `_manifest.json` are the source of truth (Triton's `--model-control-mode=poll`
is the model). An admin change on any server writes the manifest; every server that watches the
same store polls it and applies what changed through the admin API's own path
(`AdapterService.converge`, `RouterCatalogue.load_mlp`): the same validation, a refused folder
changes nothing, and a removed adapter stays with the requests that hold it until they finish.
So N servers on one store agree within one interval, without talking to each other.
"""

from __future__ import annotations

import asyncio
import logging
import time

from server.engine.errors import SwitchboardError
from server.engine.registry import AdapterVersion
from server.state import Services

log = logging.getLogger(__name__)


class StoreWatcher:
    def __init__(self, services: Services, interval: float) -> None:
        self.services, self.interval = services, interval
        self._refused_routers: dict[str, str] = {}  # name -> path refused (retried when it changes)
        self._draining: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._polling: asyncio.Task | None = None
        self._last_poll = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store-watch")

    async def stop(self) -> None:
        for task in [self._task, *self._draining]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._task, *self._draining] if t is not None), return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception:  # a bad poll must not end the watch; the next one tries again
                log.exception("store watch: poll failed")

    async def refresh(self, min_age: float = 0.5) -> None:
        """Poll now, on demand (a request named an adapter this server does not know): joins a poll
        already running, and does nothing if the last one started under `min_age` seconds ago, so
        a flood of requests for a missing name cannot turn into a flood of store scans."""
        if self._polling is None and time.monotonic() - self._last_poll < min_age:
            return
        if self._polling is None:
            self._polling = asyncio.create_task(self.poll())
            self._polling.add_done_callback(lambda _: setattr(self, "_polling", None))
        try:
            await asyncio.shield(self._polling)
        except Exception:  # the request goes on with what the server has (a 404 if still unknown)
            log.exception("store watch: on-demand poll failed")

    async def poll(self) -> dict:
        """One convergence step: adapters first (routers name them), then routers."""
        s = self.services
        self._last_poll = time.monotonic()
        report, removed = await s.adapters.converge()
        for version in removed:
            self._drain(version)
        routers = self._converge_routers()
        changes = {"loaded": report.loaded, "replaced": report.replaced, "removed": report.removed,
                   "failed": report.failed, **routers}
        if any(changes.values()):
            log.info("store watch: %s", {k: v for k, v in changes.items() if v})
        return changes

    def _drain(self, version: AdapterVersion) -> None:
        """As DELETE does, wait (bounded, off the loop) for the requests still holding `version`."""
        if not version.refcount:
            return
        timeout = self.services.settings.engine.request_timeout
        task = asyncio.create_task(asyncio.to_thread(self.services.registry.wait_idle, version, timeout))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def _converge_routers(self) -> dict:
        routing, manifest = self.services.routing, self.services.adapters.manifest
        wanted = dict(manifest.routers)  # refreshed by converge() just before
        out: dict = {"routers_loaded": [], "routers_removed": [], "routers_failed": {}}
        if not manifest.exists:
            return out
        for name in sorted(set(routing.mlp) - set(wanted)):
            routing.unload_mlp(name, record=False)
            out["routers_removed"].append(name)
        for name, path in sorted(wanted.items()):
            if routing.mlp_paths.get(name) == path or self._refused_routers.get(name) == path:
                continue
            try:
                routing.load_mlp(name, path, record=False)
            except SwitchboardError as e:
                self._refused_routers[name] = path
                out["routers_failed"][name] = e.message
            else:
                self._refused_routers.pop(name, None)
                out["routers_loaded"].append(name)
        return out
