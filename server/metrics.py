"""Prometheus metrics (prefix `switchboard_`), on a registry per app so tests can build many apps.

Labels carry registry names only (a bounded set): adapter names match a safe pattern without
colons, and requests for unknown models are counted under `model="unknown"`.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from server.engine.sequence import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WEIGHT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no `*_created` twin of every counter: half the series, nothing lost
        r = self.registry = CollectorRegistry()
        p = "switchboard_"
        self.requests = Counter(p + "requests_total", "Completion requests by model and outcome", ["model", "status"], registry=r)
        self.route_decisions = Counter(p + "route_decisions_total", "Routing decisions by router and top-1 adapter", ["router", "adapter"], registry=r)
        self.route_weight = Histogram(p + "route_weight", "Weight given to each adapter per routing decision", ["adapter"], buckets=WEIGHT_BUCKETS, registry=r)
        self.reroutes = Counter(p + "reroutes_total", "Routing decisions taken after the prompt (mid-stream)", registry=r)
        self.route_switches = Counter(p + "route_switches_total", "Mid-stream re-routes that changed the top-1 adapter", registry=r)
        self.router_latency = Histogram(p + "router_latency_seconds", "Time to compute one routing decision", ["router"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter(p + "generated_tokens_total", "Generated tokens by the top-1 adapter in force", ["adapter"], registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from arrival to the first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between consecutive tokens of one request", buckets=LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram(p + "request_latency_seconds", "Time from arrival to the last token", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(p + "batch_size", "Rows in a decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting to join the batch", registry=r)
        self.adapters_loaded = Gauge(p + "adapters_loaded", "Adapters in the registry", registry=r)
        self.adapter_load_seconds = Histogram(p + "adapter_load_seconds", "Time to validate and register an adapter", buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_events = Counter(p + "adapter_events_total", "Adapter lifecycle events", ["event"], registry=r)

    def forget_adapter(self, name: str) -> None:
        """Drop every label series that names adapter `name` (after it is unloaded), so the set of
        series stays bounded by the adapters loaded now, not every adapter ever loaded."""
        for metric, position in ((self.route_decisions, 1), (self.route_weight, 0), (self.generated_tokens, 0),
                                 (self.requests, 0)):
            for labels in list(metric._metrics):  # prometheus_client has no public "list series"
                if labels[position] == name:
                    try:
                        metric.remove(*labels)
                    except KeyError:  # removed concurrently
                        pass

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- EngineObserver (called on the engine thread) -------------------------------------------------
    def on_step(self, batch_size: int, queue_depth: int) -> None:
        if batch_size:
            self.batch_size.observe(batch_size)
        self.queue_depth.set(queue_depth)

    def on_token(self, seq: Sequence, now: float) -> None:
        self.generated_tokens.labels(seq.route.top_adapter).inc()
        if seq.last_token_at is None:
            self.ttft.observe(now - seq.created)
        else:
            self.itl.observe(now - seq.last_token_at)

    def on_route(self, seq: Sequence, weights: dict[str, float], switched: bool, seconds: float) -> None:
        router = seq.routing.router or "auto"
        self.route_decisions.labels(router, seq.route.top_adapter).inc()
        self.router_latency.labels(router).observe(seconds)
        for name, w in weights.items():
            self.route_weight.labels(name).observe(w)
        if seq.generated:
            self.reroutes.inc()
        if switched:
            self.route_switches.inc()

    def on_finish(self, seq: Sequence) -> None:
        if seq.last_token_at is not None:
            self.request_latency.observe(seq.last_token_at - seq.created)
