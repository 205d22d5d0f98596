"""What routes reach through `deps`: the app's state, and its services once the model is loaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.engine.base_model import ResidentModel
from server.engine.engine import Engine
from server.engine.registry import AdapterRegistry
from server.metrics import Metrics
from server.routing.catalogue import RouterCatalogue
from server.settings import Settings
from server.store.adapters import AdapterService
from server.worker import EngineWorker

if TYPE_CHECKING:
    from fastapi import FastAPI


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
            with engine.ctx.applied():
                return fn()

        return await self.worker.call(job)


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    registry: AdapterRegistry
    services: Services | None = None
    ready: bool = False


def app_state(app: FastAPI) -> AppState:
    """The state `create_app` attached to `app`, typed: what the route dependencies and the tests
    reach through instead of spelling out `app.state.switchboard`."""
    state: AppState = app.state.switchboard
    return state
