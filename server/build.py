"""Building the engine from settings: what `server.app` starts and what the benchmarks run
in-process, so both get the same wiring (the routing window the engine keeps hidden states
for is the router's `route_window`, the queue and slot limits come from `EngineSettings`)."""

from __future__ import annotations

from server.engine.base_model import ResidentModel
from server.engine.engine import Engine, EngineConfig, EngineObserver, GateSource
from server.engine.registry import AdapterRegistry
from server.engine.static_step import decode_step as step_for
from server.settings import EngineSettings, RoutingSettings


def build_engine(engine: EngineSettings, routing: RoutingSettings, resident: ResidentModel,
                 registry: AdapterRegistry, gate_source: GateSource | None = None,
                 observer: EngineObserver | None = None, decode_step: str | None = None) -> Engine:
    """`decode_step` overrides what `engine.compile` selects (the benchmarks compare all three)."""
    config = EngineConfig(max_loras=engine.max_loras, max_batch_size=engine.max_batch_size,
                          max_queue=engine.max_queue, hidden_window=routing.route_window,
                          decode_step=decode_step or step_for(engine.compile, resident.device))
    return Engine(resident, registry, config, gate_source=gate_source, observer=observer)
