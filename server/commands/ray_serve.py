"""Switchboard on Ray Serve (`pip install 'lora-switchboard[ray]'`, `switchboard serve-ray`).

Three deployments, one application:

- `SwitchboardReplica` (N replicas, or autoscaled on ongoing requests): one Switchboard engine
  each, the unchanged FastAPI app driven in-process (`server.commands.asgi_stream`). Every replica watches
  the adapter store (`--watch-store`), so an admin change made through any replica reaches all of
  them: one mechanism, the same as for plain servers. A request for a named adapter carries the
  name as Ray Serve's multiplexed model id (`serve.get_multiplexed_model_id`); Ray's router sends
  it to a replica that holds the adapter (and to the one with the fewest adapters when none does
  or those are busy). `auto`, mixtures and the base model carry no id, so Ray's power-of-two
  router sends them to the less loaded of two replicas.
- `Ingress` (the HTTP entry point behind Ray's proxy): reads `model` from the body, forwards the
  request with that id, streams the answer back, and retries on another replica a request whose
  replica died before its first body byte (nothing reached the client yet). `GET /metrics`
  answers with every replica's metrics, labelled `replica`.
- `MetricsHub`: replicas push their exposition every second; the ingress reads the merge.

Each response names its replica in the `x-switchboard-replica` header.
"""

# No `from __future__ import annotations`: Ray's class-based ingress rewrites the routes' signatures,
# and FastAPI must then still see real types (`Request`), not strings.
import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from server.commands.asgi_stream import HTTPRequest, stream_asgi
from server.commands.metrics_merge import merge_expositions

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-switchboard-replica"
PUSH_EVERY = 1.0  # seconds between a replica's metric pushes
STALE_AFTER = 15.0  # a replica silent this long is gone (killed, scaled down): its series leave the scrape
RETRIES = 3  # tries of a request whose replica died before it answered
_RETRYABLE = (RayActorError, ReplicaUnavailableError)
_COMPLETIONS = ("/v1/completions", "/v1/chat/completions")


def settings_from_dict(groups: dict[str, dict[str, Any]]):
    """Rebuild `Settings` in a replica from plain data (what crosses Ray's process boundary)."""
    from server.settings import Settings

    built: dict[str, Any] = {name: cls(**groups.get(name, {})) for name, cls in Settings.groups().items()}
    return Settings(**built)


def settings_to_dict(settings) -> dict[str, dict[str, Any]]:
    return {name: getattr(settings, name).model_dump(mode="json") for name in settings.groups()}


# -- the metrics hub -------------------------------------------------------------------------------------
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})  # a push per replica per second
class MetricsHub:
    def __init__(self) -> None:
        self.latest: dict[str, tuple[str, float]] = {}

    def push(self, replica: str, text: str) -> None:
        self.latest[replica] = (text, time.monotonic())

    def forget(self, replica: str) -> None:
        self.latest.pop(replica, None)

    def merged(self) -> bytes:
        now = time.monotonic()
        self.latest = {r: v for r, v in self.latest.items() if now - v[1] < STALE_AFTER}
        return merge_expositions({r: text for r, (text, _) in self.latest.items()})


# -- one engine per replica ------------------------------------------------------------------------------
async def _hold_adapter(name: str) -> str:
    """Ray Serve's "model load": the adapter is already in the replica's registry (the store watch
    put it there) and the engine makes it resident in a slot on first use, so there is nothing to
    load; the point is that Ray records which replica holds which adapter."""
    return name


@serve.deployment
class SwitchboardReplica:
    async def __init__(self, settings: dict[str, dict[str, Any]], hub: DeploymentHandle) -> None:  # type: ignore[misc]  # Ray Serve awaits an async constructor
        from server.app import create_app

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.app = create_app(settings_from_dict(settings))
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # loads the base model, restores the store, starts the watch
        self.hub = hub
        # Ray Serve keeps this replica's adapter names (the multiplexed ids) in an LRU as long as the
        # engine has slots and reports them to the routers: placement follows the adapters.
        self._hold = serve.multiplexed(max_num_models_per_replica=self._state.settings.engine.max_loras)(_hold_adapter)
        self._pusher = asyncio.create_task(self._push_metrics())
        log.info("switchboard replica %s ready", self.replica)

    @property
    def _state(self):
        return self.app.state.switchboard

    async def handle(self, request: HTTPRequest) -> AsyncIterator[dict[str, Any]]:
        name = serve.get_multiplexed_model_id()
        if name:
            if name not in self._state.registry and self.app.state.store_watcher is not None:
                await self.app.state.store_watcher.refresh()  # registered elsewhere since the last poll?
            if name in self._state.registry:
                await self._hold(name)
        async for message in stream_asgi(self.app, request, extra_headers=[(REPLICA_HEADER.encode(), self.replica.encode())]):
            yield message

    async def _push_metrics(self) -> None:
        while True:
            try:
                await self.hub.push.remote(self.replica, self._state.metrics.exposition().decode())
            except Exception as e:  # the hub restarting must not stop this replica
                log.debug("metrics push failed: %s", e)
            await asyncio.sleep(PUSH_EVERY)

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose check fails: not ready, or its engine thread died."""
        services = self._state.services
        if not self._state.ready or services is None or not services.worker.alive():
            raise RuntimeError("switchboard engine is not running")

    async def __del__(self) -> None:
        self._pusher.cancel()
        with contextlib.suppress(Exception):
            await self.hub.forget.remote(self.replica)
        await self._lifespan.__aexit__(None, None, None)  # drains in-flight requests (shutdown_grace)


# -- the HTTP ingress -----------------------------------------------------------------------------------
api = FastAPI(title="Switchboard on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None, "code": code}},
                        status_code=status, headers={"Retry-After": "1"})


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, replica: DeploymentHandle, hub: DeploymentHandle, base_names: list[str]) -> None:
        self.replica, self.hub = replica, hub
        self.unrouted = {"auto", *base_names}  # models without an adapter id: least loaded replica

    @api.get("/metrics")
    async def metrics(self) -> Response:
        body = await self.hub.merged.remote()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        call = HTTPRequest(request.method, "/" + path, request.url.query.encode(), list(request.headers.raw), body)
        adapter = self._adapter_of(call)
        # completions are safe to run again; admin changes are not retried (the caller sees 503)
        tries = RETRIES if call.path in _COMPLETIONS or call.method == "GET" else 1
        for attempt in range(1, tries + 1):
            options: dict[str, Any] = {"stream": True}
            if adapter:
                options["multiplexed_model_id"] = adapter
            stream: Any = self.replica.options(**options).handle.remote(call)  # a DeploymentResponseGenerator
            try:
                start = await stream.__anext__()
                first = await anext(stream, None)  # nothing reached the client before this: safe to retry
            except _RETRYABLE as e:
                log.warning("replica lost before answering %s %s (try %d/%d): %s", call.method, call.path,
                            attempt, tries, type(e).__name__)
                continue
            except Exception:  # a replica-side failure outside the app's own error handling
                log.exception("replica failed on %s %s", call.method, call.path)
                return _error(500, "the replica failed to answer", "replica_error")
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
            headers["x-switchboard-tries"] = str(attempt)
            return StreamingResponse(self._rest(first, stream, start), status_code=start["status"], headers=headers)
        return _error(503, "no Switchboard replica could take the request; retry", "replica_unavailable")

    def _adapter_of(self, call: HTTPRequest) -> str | None:
        """The named adapter a completion asks for: Ray Serve's multiplexed model id."""
        if call.method != "POST" or call.path not in _COMPLETIONS:
            return None
        try:
            model = json.loads(call.body).get("model")
        except (ValueError, AttributeError):
            return None  # the replica answers the 400
        return model if isinstance(model, str) and model and model not in self.unrouted else None

    @staticmethod
    async def _rest(first: dict | None, stream, start: dict) -> AsyncIterator[bytes]:
        finished = False
        try:
            if first is not None:
                yield first["body"]
            async for message in stream:
                yield message["body"]
            finished = True
        except Exception as e:  # the replica died mid-stream: end the stream with an error the client can see
            finished = True
            log.warning("replica lost mid-stream: %s", type(e).__name__)
            if any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"]):
                error = {"message": "the replica serving this stream was lost", "type": "server_error",
                         "param": None, "code": "replica_lost"}
                yield f"data: {json.dumps({'error': error})}\n\n".encode()
        finally:
            if not finished:  # the client went away: stop the replica's generation (it releases the rows)
                stream.cancel()


# -- building the application ----------------------------------------------------------------------------
def build_app(settings, *, replicas: int | None = 1, min_replicas: int | None = None, max_replicas: int | None = None,
              target_ongoing_requests: float = 8.0, num_cpus: float = 1.0, num_gpus: float = 0.0,
              max_ongoing_requests: int | None = None):
    """The Serve application: `replicas` fixed replicas, or autoscaling between `min_replicas`
    and `max_replicas` on ongoing requests per replica (`target_ongoing_requests`)."""
    from server.engine.base_model import model_id_of

    s = settings_to_dict(settings)
    s["store"]["watch_store"] = s["store"]["watch_store"] or 2.0  # replicas converge on the store: always on
    if not s["engine"]["torch_threads"] and num_cpus >= 1:
        s["engine"]["torch_threads"] = int(num_cpus)  # one torch thread per reserved CPU, not per core
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": max_ongoing_requests or s["engine"]["max_batch_size"] + s["engine"]["max_queue"],
    }
    if min_replicas is not None or max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": min_replicas or 1, "max_replicas": max_replicas or max(min_replicas or 1, 1),
                                         "target_ongoing_requests": target_ongoing_requests}
    else:
        options["num_replicas"] = replicas or 1
    hub = _deployment(MetricsHub).bind()
    replica = _deployment(SwitchboardReplica).options(**options).bind(s, hub)
    base = s["model"]["base_model"]
    return _deployment(Ingress).bind(replica, hub, sorted({base, model_id_of(base), "base"}))


def _deployment(cls: Any) -> Any:
    """`@serve.deployment` turned the class into a `Deployment`; type checkers still see the class."""
    return cls


def app_builder(args: dict[str, Any]):
    """For `serve run` / a Serve config file: `import_path: server.commands.ray_serve:app_builder`, `args`
    holding the settings by name (as `SWITCHBOARD_*` without the prefix, lower case) and
    `replicas`, `min_replicas`, `max_replicas`, `target_ongoing_requests`, `num_cpus`, `num_gpus`."""
    from server.settings import Settings

    groups_of = Settings.groups()
    args = dict(args)
    build_args = {k: args.pop(k) for k in ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests",
                                           "num_cpus", "num_gpus", "max_ongoing_requests") if k in args}
    groups: dict[str, Any] = {name: cls(**{k: v for k, v in args.items() if k in cls.model_fields})
                              for name, cls in groups_of.items()}
    unknown = set(args) - {k for cls in groups_of.values() for k in cls.model_fields}
    if unknown:
        raise ValueError(f"unknown Switchboard settings in the Serve config: {sorted(unknown)}")
    return build_app(Settings(**groups), **build_args)
