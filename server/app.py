"""`create_app(settings)`: the FastAPI app, its state, and the engine's start and graceful stop."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from server.api import edges, ui
from server.api.body_limit import BodyLimit
from server.api.http_errors import install_error_handlers
from server.api.routes import admin, chat, completions, health, lorax, models, tokenize
from server.build import build_engine, build_routing
from server.engine.adapter_weights import BaseSpec
from server.engine.base_model import ResidentModel, load_base_model
from server.engine.host_tier import HostTier
from server.engine.registry import AdapterRegistry
from server.metrics import Metrics
from server.settings import Settings
from server.state import AppState, Services
from server.store.adapters import AdapterService
from server.store.example_centroids import centroids_from_examples
from server.store.manifest import Manifest
from server.store.watch import StoreWatcher
from server.worker import EngineWorker

log = logging.getLogger(__name__)


async def start(state: AppState, resident: ResidentModel | None) -> None:
    s = state.settings
    if s.engine.torch_threads:
        torch.set_num_threads(s.engine.torch_threads)
    if resident is None:
        resident = await asyncio.to_thread(load_base_model, s.model.base_model, s.model.device, s.model.dtype,
                                           s.model.quant)
    s.store.adapter_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(s.store.adapter_dir)
    routing, gater = build_routing(s.routing, resident, state.registry, s.store.adapter_dir, manifest)
    engine = build_engine(s.engine, s.routing, resident, state.registry, gate_source=gater, observer=state.metrics)
    # The warm-up runs on the engine thread, the thread that decodes afterwards: CUDA graph trees
    # keep per-thread state, and a graph recorded on one thread then replayed on another asserts
    # (pytorch#123177). It compiles the static step (logged) before /ready says 200.
    worker = EngineWorker(engine)
    worker.start()
    try:
        await worker.call(lambda: engine.warm_up(fallback=s.engine.compile == "auto"))
    except BaseException:
        await worker.drain(0.0)  # no thread left behind by a start-up that failed
        raise
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, s.store.max_lora_rank, resident.dtype)
    adapters = AdapterService(s.store.adapter_dir, spec, state.registry, state.metrics, manifest)
    adapters.on_change.append(routing.rebuild)
    state.services = Services(s, state.metrics, state.registry, resident, engine, worker, adapters, routing)
    adapters.default_prepare = centroids_from_examples(routing, state.services.engine_call)
    if s.store.scan_on_start or manifest.exists:
        # a manifest is restored exactly; without one, every folder in the store is registered.
        # Only indexed: the factors are read on first use (the host tier), so /ready does not wait on them
        scan = s.store.scan_on_start and not manifest.exists
        report = await adapters.restore(scan_folders=scan)
        failed_routers = routing.scan_routers(scan_folders=scan)
        shown = report.loaded if len(report.loaded) <= 20 else f"{len(report.loaded)} adapters"
        log.info("store index: registered %s, refused %s, routers %s (refused %s)", shown, report.failed,
                 routing.router_names(), failed_routers)
    state.ready = True


def create_app(settings: Settings | None = None, resident: ResidentModel | None = None) -> FastAPI:
    """Build the app. `resident` lets a caller (the CLI, tests) load the model up front."""
    settings = settings or Settings()
    host = HostTier(settings.store.max_cpu_adapters, settings.store.max_cpu_adapter_mb << 20)
    state = AppState(settings=settings, metrics=Metrics(), registry=AdapterRegistry(host))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await start(state, resident)
        watcher = None
        if settings.store.watch_store and state.services is not None:
            watcher = StoreWatcher(state.services, settings.store.watch_store)
            watcher.start()
        app.state.store_watcher = watcher
        try:
            yield
        finally:
            state.ready = False
            if watcher is not None:
                await watcher.stop()
            if state.services is not None:
                await state.services.worker.drain(settings.engine.shutdown_grace)
                if state.services.adapters.record_task is not None:
                    await state.services.adapters.record_task

    app = FastAPI(title="Switchboard", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.switchboard = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.server.max_body_bytes)
    edges.install(app, settings)  # after BodyLimit: CORS and the API key sit outside it
    for module in (health, models, completions, chat, tokenize, lorax, admin):
        app.include_router(module.router)
    ui.install(app)  # /, /playground, and /docs + /redoc without a CDN
    return app
