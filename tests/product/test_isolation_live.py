"""On a real server: streams end with an error event and `[DONE]` on every failure, the request
timeout bounds total time even while tokens keep arriving, abandoned requests (streaming or not)
are cancelled and counted as 499, and, the issue's "done when": every reproduction of the
fuzzing report is refused while six other streams on the server finish normally."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx

from tests.conftest import ADMIN
from tests.handle import AppHandle
from tests.live import engine_paused, live_server, wait_until
from tests.server.test_isolation_api import REPRODUCTIONS
from tests.tiny import app_settings


def _slow_engine(app, monkeypatch, seconds: float = 0.03) -> None:
    """Every forward takes at least `seconds`, so a long generation outlasts a short timeout."""
    engine = AppHandle(app).engine
    real = engine._forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", slow)


def _sse(base: str, body: dict, timeout: float = 60) -> tuple[int, list[str]]:
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=timeout) as r:
        return r.status_code, [line for line in r.iter_lines() if line.startswith("data:")]


def _metric(base: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(f"{base}/metrics").text.splitlines()
               if line.startswith(prefix))


def test_timeouts_end_streams_with_an_error_event_and_done(tiny_model_dir, store, monkeypatch):
    settings = app_settings(tiny_model_dir, store, engine={"request_timeout": 1.0})
    with live_server(settings) as (base, app):
        # 1) never admitted: the engine is held past the deadline
        with engine_paused(app, timeout=60) as release:
            result: dict = {}
            t = threading.Thread(target=lambda: result.update(zip(("status", "lines"), _sse(
                base, {"model": "alpha", "prompt": "x", "max_tokens": 5}), strict=True)))
            t.start()
            t.join(timeout=30)
            release.set()
        assert result["status"] == 200
        assert result["lines"][-1] == "data: [DONE]"
        assert json.loads(result["lines"][-2][6:])["error"]["type"] == "timeout_error"
        # 2) tokens keep arriving, but the total time is bounded
        _slow_engine(app, monkeypatch)
        status, lines = _sse(base, {"model": "alpha", "prompt": "x", "max_tokens": 110, "ignore_eos": True})
        assert status == 200 and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "timeout"
        assert 0 < len(lines) - 2 < 110  # tokens came, then the deadline cut it
        r = httpx.post(f"{base}/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 110, "ignore_eos": True},
                       timeout=60)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        wait_until(lambda: AppHandle(app).idle(), what="the engine to drop the timed-out rows")
        assert _metric(base, 'switchboard_requests_total{model="alpha",status="504"}') == 2


def test_abandoned_requests_are_cancelled_and_counted_499(tiny_model_dir, store, monkeypatch):
    with live_server(app_settings(tiny_model_dir, store)) as (base, app):
        _slow_engine(app, monkeypatch)
        engine = AppHandle(app).engine
        # non-streaming: the client gives up; the server notices while tokens are still arriving
        try:
            httpx.post(f"{base}/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 110, "ignore_eos": True},
                       timeout=0.6)
            raise AssertionError("the request should have outlasted the client's timeout")
        except httpx.ReadTimeout:
            pass
        wait_until(lambda: AppHandle(app).idle(), timeout=20, what="the abandoned non-streaming row to be cancelled")
        assert _metric(base, "switchboard_generated_tokens_total{") < 110
        wait_until(lambda: _metric(base, 'switchboard_requests_total{model="alpha",status="499"}') == 1,
                   timeout=10, what="the abandoned request to be counted as 499")
        # streaming: read one token, then hang up
        with httpx.stream("POST", f"{base}/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 110, "ignore_eos": True,
                                                                 "stream": True}, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data: {"))
        wait_until(lambda: AppHandle(app).idle(), timeout=20, what="the abandoned stream to be cancelled")
        wait_until(lambda: _metric(base, 'switchboard_requests_total{model="beta",status="499"}') == 1,
                   timeout=10, what="the abandoned stream to be counted as 499")
        assert engine.running == []


async def _stream(client: httpx.AsyncClient, body: dict) -> tuple[int, list[str]]:
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        return r.status_code, [line async for line in r.aiter_lines() if line.startswith("data:")]


def six_streams() -> list[dict]:
    """Six requests of every kind (two adapters, a manual mixture, the base model; greedy and
    sampled) that must run unharmed beside each reproduction."""
    streams = [{"model": m, "prompt": p, "max_tokens": 40, "temperature": t, "seed": 7}
               for m, p, t in [("alpha", "def add(a, b):", 0), ("beta", "It is a truth", 0.9),
                               ("auto", "for i in range(10):", 0), ("base", "The quick brown fox", 0),
                               ("alpha", "import numpy as np", 1.0), ("beta", "Mr. Holmes looked", 0)]]
    streams[2]["routing"] = {"weights": {"alpha": 0.3, "beta": 0.7}}
    return streams


def _finished_normally(status: int, lines: list[str], max_tokens: int) -> bool:
    if status != 200 or len(lines) < 2 or lines[-1] != "data: [DONE]":
        return False
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    return all("error" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_done_when_reproductions_refused_while_six_streams_finish(tiny_model_dir, store, monkeypatch):
    """Each reproduction gets its 4xx (the huge-alpha adapter a refusal at registration) while six
    other streams on the server run; the six finish normally with the same text as on an idle
    server, and every adapter reference is back at 0."""
    folder = store / "loud"
    import shutil

    shutil.copytree(store / "alpha", folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 1e38}))
    (store / "_manifest.json").write_text(json.dumps({"adapters": [{"name": "alpha", "path": "alpha"},
                                                                   {"name": "beta", "path": "beta"}]}))
    with live_server(app_settings(tiny_model_dir, store)) as (base, app):
        streams = six_streams()
        idle = [_sse(base, body) for body in streams]
        assert all(_finished_normally(s, lines, 40) for s, lines in idle)
        _slow_engine(app, monkeypatch, 0.01)  # the streams last long enough to overlap every reproduction

        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                running = [asyncio.create_task(_stream(client, body)) for body in streams]
                engine = AppHandle(app).engine
                while len(engine.running) < 6:
                    await asyncio.sleep(0.01)
                refused = []
                for body, status, _ in REPRODUCTIONS:
                    r = await client.post("/v1/completions", content=json.dumps(body),
                                          headers={"content-type": "application/json"})
                    refused.append((r.status_code, status))
                    s = await client.post("/v1/completions", content=json.dumps({**body, "stream": True}),
                                          headers={"content-type": "application/json"})
                    refused.append((s.status_code, status))
                loud = await client.post("/admin/adapters", json={"name": "loud", "path": "loud"}, headers=ADMIN)
                still_running = len(engine.running)
                return await asyncio.gather(*running), refused, loud, still_running

        results, refused, loud, still_running = asyncio.run(scenario())
        assert all(got == want for got, want in refused), refused
        assert loud.status_code == 400 and "scale" in loud.json()["error"]["message"]
        assert still_running > 0, "the streams ended before the reproductions were sent"
        assert [_finished_normally(s, lines, 40) for s, lines in results] == [True] * 6
        assert [lines for _, lines in results] != [], results
        texts = [[json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]] for _, lines in results]
        assert texts == [[json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]] for _, lines in idle]
        wait_until(lambda: AppHandle(app).idle(), what="every reference to be released")
        adapters = httpx.get(f"{base}/admin/adapters", headers=ADMIN).json()["adapters"]
        assert {a["name"]: a["in_flight"] for a in adapters} == {"alpha": 0, "beta": 0}
