"""Many clients at once: batched results equal sequential ones, hot-swap under load, backpressure,
disconnects, restarts and graceful shutdown. Bounded, loopback only."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx

from server.store.manifest import Manifest
from tests.conftest import ADMIN
from tests.handle import AppHandle
from tests.live import (
    assert_abandoned_stream_cancelled,
    begin_shutdown,
    engine_paused,
    live_server,
    wait_until,
)
from tests.tiny import app_settings, make_adapter

PROMPTS = ["def add(a, b):", "It is a truth universally", "Natalia sold clips", "for i in range(10):",
           "Mr. Holmes looked", "import numpy as np", "The quick brown fox", "x = np.zeros(3)"]
MODELS = [{"model": "alpha"}, {"model": "beta"}, {"model": "auto", "routing": {"weights": {"alpha": 0.3, "beta": 0.7}}},
          {"model": "tiny-gpt2"}]


def _body(i: int, **extra) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 12, "temperature": 0, **MODELS[i % len(MODELS)], **extra}


async def _stream(client: httpx.AsyncClient, body: dict) -> tuple[int, str]:
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return r.status_code, await r.aread()
        text = ""
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
        return 200, text


def test_concurrent_mixed_requests_equal_sequential(tiny_model_dir, store):
    with live_server(app_settings(tiny_model_dir, store)) as (base, app):
        base_id = AppHandle(app).resident.model_id
        bodies = [_body(i) for i in range(16)]
        for b in bodies:
            if b["model"] == "tiny-gpt2":
                b["model"] = base_id
        sequential = [httpx.post(f"{base}/v1/completions", json=b, timeout=60).json()["choices"][0]["text"] for b in bodies]

        async def together():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                return await asyncio.gather(*(_stream(client, b) for b in bodies))

        results = asyncio.run(together())
        assert [r[0] for r in results] == [200] * 16
        assert [r[1] for r in results] == sequential
        assert len(set(sequential)) > 4
        metrics = httpx.get(f"{base}/metrics").text
        sizes = [line for line in metrics.splitlines() if line.startswith("switchboard_batch_size_bucket")]
        assert any('le="1.0"' not in s and float(s.split()[-1]) > 0 for s in sizes[1:]), "no step ran more than one row"


def test_hot_swap_under_streaming_load(tiny_model_dir, store):
    """8 streaming clients loop while `alpha` is replaced 20 times, alternating two versions: no
    request fails, and every output is exactly one version's output (never a mix)."""
    make_adapter(tiny_model_dir, store / "alpha_v2", seed=77)
    settings = app_settings(tiny_model_dir, store)
    with live_server(settings) as (base, app):
        engine = AppHandle(app).engine
        body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
        v1 = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        httpx.post(f"{base}/admin/adapters", json={"name": "alpha", "path": "alpha_v2"}, headers=ADMIN, timeout=60)
        v2 = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert v1 != v2
        stop = threading.Event()
        swap_ms: list[float] = []
        started = [0]

        def swapper():
            seen = 0
            for i in range(20):
                # every swap happens under load, and after a request that started since the last one
                deadline = time.monotonic() + 30
                while (not engine.running or started[0] <= seen) and time.monotonic() < deadline:
                    time.sleep(0.001)
                seen = started[0]
                t0 = time.perf_counter()
                r = httpx.post(f"{base}/admin/adapters", json={"name": "alpha", "path": ["alpha", "alpha_v2"][i % 2]},
                               headers=ADMIN, timeout=60)
                swap_ms.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
                time.sleep(0.05)
            stop.set()

        async def clients():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                async def loop():
                    out = []
                    while (not stop.is_set() or len(out) < 2) and len(out) < 200:
                        started[0] += 1
                        out.append(await _stream(client, body))
                    return out
                return await asyncio.gather(*(loop() for _ in range(8)))

        thread = threading.Thread(target=swapper)
        thread.start()
        results = [r for per_client in asyncio.run(clients()) for r in per_client]
        thread.join(timeout=120)
        assert len(swap_ms) == 20
        assert {status for status, _ in results} == {200}
        texts = [t for _, t in results]
        assert set(texts) <= {v1, v2}, set(texts) - {v1, v2}
        assert len(results) >= 16 and texts.count(v1) and texts.count(v2)
        swap_ms.sort()
        print(f"\n{len(results)} streams during 20 replacements; replace latency p50 {swap_ms[10]:.1f} ms, "
              f"max {swap_ms[-1]:.1f} ms; outputs v1={texts.count(v1)} v2={texts.count(v2)}")
        adapters = httpx.get(f"{base}/admin/adapters", headers=ADMIN).json()["adapters"]
        assert all(a["in_flight"] == 0 for a in adapters)


def test_full_queue_answers_429(tiny_model_dir, store):
    settings = app_settings(tiny_model_dir, store, engine={"max_batch_size": 1, "max_queue": 1})
    with live_server(settings) as (base, app):
        engine = AppHandle(app).engine
        results: dict = {}
        with engine_paused(app):
            queued = threading.Thread(target=lambda: results.setdefault("queued", httpx.post(
                f"{base}/v1/completions", json={"model": "beta", "prompt": "y", "max_tokens": 2}, timeout=60)))
            queued.start()
            wait_until(lambda: engine.queue_depth() == 1, what="the first request to queue")
            refused = httpx.post(f"{base}/v1/completions", json={"model": "beta", "prompt": "z", "max_tokens": 2})
        queued.join(timeout=60)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert results["queued"].status_code == 200
        assert 'switchboard_requests_total{model="beta",status="429"} 1.0' in httpx.get(f"{base}/metrics").text


def test_disconnect_frees_the_row(tiny_model_dir, store):
    settings = app_settings(tiny_model_dir, store)
    with live_server(settings) as (base, app):
        with httpx.stream("POST", f"{base}/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 110,
                                                                 "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
        assert_abandoned_stream_cancelled(base, app, 110, ADMIN)


def _stream_lines(base: str, body: dict, out: dict) -> None:
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        out["status"] = r.status_code
        out["lines"] = [line for line in r.iter_lines() if line.startswith("data:")]


def _completed(result: dict) -> bool:
    """The stream ended normally: a final chunk with a finish reason, then [DONE]."""
    lines = result.get("lines", [])
    if result.get("status") != 200 or len(lines) < 2 or lines[-1] != "data: [DONE]":
        return False
    return json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")


def test_unload_in_use_waits_or_conflicts(tiny_model_dir, store):
    settings = app_settings(tiny_model_dir, store)
    with live_server(settings) as (base, app):
        registry = AppHandle(app).registry
        result: dict = {}
        with engine_paused(app) as release:
            thread = threading.Thread(target=_stream_lines, args=(base, {"model": "alpha", "prompt": "x",
                                                                        "max_tokens": 30}, result))
            thread.start()
            wait_until(lambda: registry.get("alpha").refcount == 1, what="the stream to hold alpha")
            conflict = httpx.delete(f"{base}/admin/adapters/alpha?wait=false", headers=ADMIN)
            assert conflict.status_code == 409 and "alpha" in registry
            release.set()  # let the stream run; the waiting unload returns once it has finished
            unload = httpx.delete(f"{base}/admin/adapters/alpha", headers=ADMIN, timeout=60)
        thread.join(timeout=60)
        assert unload.status_code == 200
        assert _completed(result)
        assert httpx.post(f"{base}/v1/completions", json={"model": "alpha", "prompt": "y"}).status_code == 404


def test_restart_restores_registry_and_routers(tiny_model_dir, store):
    from router_core.artifacts import save_router
    from router_core.mlp import MLPRouter, MLPRouterNet

    make_adapter(tiny_model_dir, store / "nested" / "gamma", seed=5)
    save_router(store / "_routers" / "r1", MLPRouter(MLPRouterNet(64, 2, 0), ["alpha", "gamma"], "base:64"))
    settings = app_settings(tiny_model_dir, store)
    with live_server(settings) as (base, _):
        assert httpx.post(f"{base}/admin/adapters", json={"name": "gamma", "path": "nested/gamma", "pinned": True},
                          headers=ADMIN).status_code == 200
        assert httpx.delete(f"{base}/admin/adapters/beta", headers=ADMIN).status_code == 200
        assert httpx.post(f"{base}/admin/routers", json={"name": "r1"}, headers=ADMIN).status_code == 200
    assert sorted(Manifest(store).adapters) == ["alpha", "gamma"]  # the snapshot and its journal
    with live_server(settings) as (base, _):
        adapters = {a["name"]: a for a in httpx.get(f"{base}/admin/adapters", headers=ADMIN).json()["adapters"]}
        assert set(adapters) == {"alpha", "gamma"}  # beta was unloaded and stays unloaded
        assert adapters["gamma"]["pinned"] is True
        routers = [r["name"] for r in httpx.get(f"{base}/admin/routers", headers=ADMIN).json()["routers"]]
        assert routers == ["centroid", "arrow", "r1"]


def test_graceful_shutdown_finishes_in_flight(tiny_model_dir, store):
    """Shutdown begins while a request is in flight; the request still completes in full."""
    settings = app_settings(tiny_model_dir, store, engine={"shutdown_grace": 30})
    result: dict = {}
    with live_server(settings) as (base, app):
        engine = AppHandle(app).engine
        with engine_paused(app):
            thread = threading.Thread(target=_stream_lines, args=(base, {"model": "alpha", "prompt": "x",
                                                                        "max_tokens": 60}, result))
            thread.start()
            wait_until(lambda: engine.queue_depth() == 1, what="the stream to queue")
            begin_shutdown(app)  # stop accepting; in-flight work continues
            time.sleep(0.2)
    thread.join(timeout=60)
    assert _completed(result)
