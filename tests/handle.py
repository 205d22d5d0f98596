"""One handle on a running app's insides, for the tests that must look past the HTTP API (the
engine's rows, the registry's references, the resident tokenizer).

`AppHandle(app)` reaches the state through `server.state.app_state`, so a test names what it looks
at (`.engine`, `.tokenizer`) rather than the path to it; when that path changes, this file changes
and the tests do not.
"""

from __future__ import annotations

from fastapi import FastAPI
from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase

from server.engine.base_model import ResidentModel
from server.engine.engine import Engine
from server.engine.registry import AdapterRegistry
from server.metrics import Metrics
from server.state import AppState, Services, app_state
from server.worker import EngineWorker


class AppHandle:
    """The parts of `app` tests inspect. Pass `client.app` for a TestClient, or the app
    `tests.live.live_server` yields."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    @property
    def state(self) -> AppState:
        return app_state(self.app)

    @property
    def services(self) -> Services:
        services = self.state.services
        assert services is not None, "the app has not loaded its model yet (enter the TestClient or live_server first)"
        return services

    @property
    def registry(self) -> AdapterRegistry:
        return self.state.registry

    @property
    def metrics(self) -> Metrics:
        return self.state.metrics

    @property
    def engine(self) -> Engine:
        return self.services.engine

    @property
    def worker(self) -> EngineWorker:
        return self.services.worker

    @property
    def resident(self) -> ResidentModel:
        return self.services.resident

    @property
    def model(self) -> GPT2LMHeadModel:
        return self.resident.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.resident.tokenizer

    def idle(self) -> bool:
        """Nothing queued or running in the engine, and no adapter reference held."""
        return not self.engine.has_work() and all(v.refcount == 0 for v in self.registry.snapshot().values())
