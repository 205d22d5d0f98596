"""Everything a route needs, built once per app by `create_app` and reached through `deps`."""

from __future__ import annotations

from dataclasses import dataclass

from server.adapters import AdapterService
from server.engine.base_model import ResidentModel
from server.engine.engine import Engine
from server.engine.registry import AdapterRegistry
from server.metrics import Metrics
from server.routing import RoutingService
from server.settings import Settings
from server.worker import EngineWorker


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    registry: AdapterRegistry
    resident: ResidentModel | None = None
    engine: Engine | None = None
    worker: EngineWorker | None = None
    adapters: AdapterService | None = None
    routing: RoutingService | None = None
    ready: bool = False

    async def engine_call(self, fn):
        """Run `fn` on the engine thread with no adapter gates set (a plain base-model forward)."""
        engine = self.engine

        def job():
            engine.ctx.clear()
            return fn()

        return await self.worker.call(job)
