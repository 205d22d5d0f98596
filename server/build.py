"""Building the engine and the routing from settings: what `server.app` starts and what the
benchmarks run in-process, so both get the same wiring (the routing window the engine keeps
hidden states for is the router's `route_window`, the queue and slot limits come from
`EngineSettings`, the gater reads the catalogue the admin routes change)."""

from __future__ import annotations

from pathlib import Path

from server.engine.base_model import ResidentModel
from server.engine.engine import Engine, EngineConfig, EngineObserver, GateSource
from server.engine.registry import AdapterRegistry
from server.engine.static_step import decode_step as step_for
from server.routing.catalogue import RouterCatalogue, prompt_window
from server.routing.gater import Gater
from server.settings import EngineSettings, RoutingSettings
from server.store.manifest import Manifest


def build_routing(settings: RoutingSettings, resident: ResidentModel, registry: AdapterRegistry, store: Path,
                  manifest: Manifest | None = None) -> tuple[RouterCatalogue, Gater]:
    """The router catalogue over `store` and the gater the engine calls, reading it."""
    catalogue = RouterCatalogue(settings, resident, registry, store, manifest or Manifest(store))
    return catalogue, Gater(catalogue, settings)


def _step(engine: EngineSettings, resident: ResidentModel) -> str:
    """What `--compile` selects; `--quant int8`/`w8a8` stays on the eager step under `auto` (the static
    step reads the float weights; `--compile on` with int8 is refused by the settings)."""
    if resident.quant != "none" and engine.compile == "auto":
        return "eager"
    return step_for(engine.compile, resident.device)


def build_engine(engine: EngineSettings, routing: RoutingSettings, resident: ResidentModel,
                 registry: AdapterRegistry, gate_source: GateSource | None = None,
                 observer: EngineObserver | None = None, decode_step: str | None = None) -> Engine:
    """`decode_step` overrides what `engine.compile` selects (the benchmarks compare all three)."""
    config = EngineConfig(max_loras=engine.max_loras, max_batch_size=engine.max_batch_size,
                          max_queue=engine.max_queue, hidden_window=routing.route_window,
                          prompt_window=prompt_window(routing, resident.max_positions),
                          decode_step=decode_step or _step(engine, resident))
    return Engine(resident, registry, config, gate_source=gate_source, observer=observer)
