"""The pieces the Ray Serve deployment is built from, without a cluster: the in-process ASGI
stream (a replica's way to answer), the merged replica-labelled metrics, and the app builder."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.commands.asgi_stream import HTTPRequest, stream_asgi
from server.commands.metrics_merge import merge_expositions
from server.metrics import Metrics
from tests.conftest import ADMIN
from tests.handle import AppHandle
from tests.paths import REPO
from tests.tiny import app_settings


def _run_app(tiny_model_dir, store, scenario):
    """Run `scenario(app)` inside the app's lifespan (model loaded, store restored)."""
    from server.app import create_app

    app = create_app(app_settings(tiny_model_dir, store))

    async def main():
        async with app.router.lifespan_context(app):
            return await scenario(app)

    return asyncio.run(main())


def _post(path: str, body: dict, headers=()) -> HTTPRequest:
    return HTTPRequest("POST", path, b"", [(b"content-type", b"application/json"), *headers], json.dumps(body).encode())


def test_stream_asgi_streams_the_apps_answer(tiny_model_dir, store):
    body = {"model": "alpha", "prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0}

    async def scenario(app):
        plain = [m async for m in stream_asgi(app, _post("/v1/completions", body), extra_headers=[(b"x-r", b"r1")])]
        streamed = [m async for m in stream_asgi(app, _post("/v1/completions", {**body, "stream": True}))]
        missing = [m async for m in stream_asgi(app, _post("/v1/completions", {**body, "model": "nope"}))]
        admin = [m async for m in stream_asgi(app, HTTPRequest("GET", "/admin/adapters", headers=[
            (b"authorization", ADMIN["Authorization"].encode())]))]
        return plain, streamed, missing, admin

    plain, streamed, missing, admin = _run_app(tiny_model_dir, store, scenario)
    assert plain[0]["status"] == 200 and (b"x-r", b"r1") in plain[0]["headers"]
    text = json.loads(b"".join(m["body"] for m in plain[1:]))["choices"][0]["text"]
    assert streamed[0]["status"] == 200 and len(streamed) > 3  # one chunk per token, not one at the end
    events = b"".join(m["body"] for m in streamed[1:]).decode().split("\n\n")
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events if e.startswith("data: {")) == text
    assert events[-2] == "data: [DONE]"
    assert missing[0]["status"] == 404
    assert json.loads(b"".join(m["body"] for m in missing[1:]))["error"]["code"] == "model_not_found"
    assert admin[0]["status"] == 200


def test_closing_the_stream_cancels_the_request_and_releases_its_adapter(tiny_model_dir, store):
    body = {"model": "alpha", "prompt": "x", "max_tokens": 100, "temperature": 0, "stream": True}

    async def scenario(app):
        registry = AppHandle(app).registry
        version = registry.get("alpha")
        stream = stream_asgi(app, _post("/v1/completions", body))
        start = await anext(stream)
        await anext(stream)  # the first token arrived
        held = version.refcount
        await stream.aclose()  # the client went away
        metrics = ""
        for _ in range(500):
            metrics = AppHandle(app).metrics.exposition().decode()
            if version.refcount == 0 and 'status="499"' in metrics:
                break
            await asyncio.sleep(0.01)
        return start, held, version.refcount, metrics

    start, held, after, metrics = _run_app(tiny_model_dir, store, scenario)
    assert start["status"] == 200 and held == 1 and after == 0
    # counted as a client that went away, exactly as for a dropped HTTP connection
    assert 'switchboard_requests_total{model="alpha",status="499"} 1.0' in metrics
    assert 'status="200"' not in metrics


def test_merged_metrics_label_every_replica():
    a, b = Metrics(), Metrics()
    a.requests.labels("alpha", "200").inc(3)
    b.requests.labels("alpha", "200").inc(2)
    b.route_weight.labels("alpha").observe(0.3)
    merged = merge_expositions({"r1": a.exposition().decode(), "r2": b.exposition().decode()}).decode()
    assert 'switchboard_requests_total{model="alpha",replica="r1",status="200"} 3.0' in merged
    assert 'switchboard_requests_total{model="alpha",replica="r2",status="200"} 2.0' in merged
    assert 'switchboard_route_weight_bucket{adapter="alpha",le="0.3",replica="r2"} 1.0' in merged
    assert merged.count("# TYPE switchboard_requests_total counter") == 1  # one family, two replicas
    assert merge_expositions({}) == b""


def test_app_builder_reads_settings_and_scaling(tiny_model_dir, store):
    pytest.importorskip("ray.serve", reason="the `ray` extra is not installed")
    from server.commands.ray_serve import app_builder

    app = app_builder({"base_model": str(tiny_model_dir), "adapter_dir": str(store), "device": "cpu",
                       "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4, "num_cpus": 2})
    ingress = app._bound_deployment
    replica = ingress.init_args[0]._bound_deployment
    config = replica._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (1, 3, 4)
    settings = replica.init_args[0]
    assert settings["store"]["watch_store"] == 2.0 and settings["engine"]["torch_threads"] == 2
    assert settings["model"]["base_model"] == str(tiny_model_dir)
    with pytest.raises(ValueError, match="max_lora"):
        app_builder({"max_lora": 3})


def test_shipped_serve_config_builds(tiny_model_dir, store):
    """docker/ray-serve.yaml names the builder and only settings it accepts."""
    pytest.importorskip("ray.serve", reason="the `ray` extra is not installed")
    import importlib

    import yaml

    config = yaml.safe_load((REPO / "docker" / "ray-serve.yaml").read_text())
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    args = {**app["args"], "base_model": str(tiny_model_dir), "adapter_dir": str(store), "device": "cpu"}
    built = builder(args)._bound_deployment.init_args[0]._bound_deployment
    assert built._deployment_config.autoscaling_config.max_replicas == app["args"]["max_replicas"]
    assert built.ray_actor_options["num_gpus"] == app["args"]["num_gpus"]
