"""What routes reach through `deps`: the app's state, and its services once the model is loaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.adapters import AdapterService
from server.engine.base_model import ResidentModel
from server.engine.engine import Engine
from server.engine.registry import AdapterRegistry
from server.metrics import Metrics
from server.routing import RouterCatalogue
from server.settings import Settings
from server.worker import EngineWorker


@dataclass
class Services:
    """Everything that exists once the base model is loaded (so none of it is Optional)."""

    settings: Settings
    metrics: Metrics
    registry: AdapterRegistry
    resident: ResidentModel
    engine: Engine
    worker: EngineWorker
    adapters: AdapterService
    routing: RouterCatalogue  # the router catalogue (the engine holds the gater that reads it)

    async def engine_call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread with no adapter gates set (a plain base-model forward)."""
        engine = self.engine

        def job() -> Any:
            engine.ctx.clear()
            return fn()

        return await self.worker.call(job)


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    registry: AdapterRegistry
    services: Services | None = None
    ready: bool = False
