"""A real uvicorn server on 127.0.0.1 in a background thread, for tests that need concurrency,
disconnects or shutdown (TestClient serialises requests and cannot drop a connection)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from server.app import create_app
from server.local import NotReady, free_port, wait_ready
from tests.handle import AppHandle


@contextmanager
def live_server(settings, timeout: float = 60.0):
    """Yield (base_url, app); the server is stopped (gracefully) on exit."""
    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    app.state.uvicorn_server = server  # lets a test begin the shutdown itself
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/ready", timeout, dead=lambda: None if thread.is_alive() else "its thread ended",
                   interval=0.1)
    except NotReady:
        server.should_exit = True
        raise
    try:
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


CLIENT_KEY = "sk-switchboard-test"  # the API key of `client_server`
EXAMPLES = {"alpha": ["def add(a, b): return a + b", "import os"],
            "beta": ["It was a dark and stormy night", "Mr. Holmes said"]}


@dataclass(frozen=True)
class ClientServer:
    base: str  # http://127.0.0.1:<port> (the OpenAI routes are under /v1)
    app: object
    key: str = CLIENT_KEY


@contextmanager
def client_server(root: Path):
    """The live server the real-client tests (openai, LangChain, LiteLLM, lorax-client) talk to:
    the tiny GPT-2 with adapters `alpha` (rank 4) and `beta` (rank 8, attention + MLP), API key
    CLIENT_KEY, admin token `T`, and both adapters re-registered with example texts so `auto`
    has centroids to route on."""
    import httpx

    from tests.tiny import app_settings, make_adapter, save_model

    model_dir = save_model(root / "tiny-gpt2")
    store = root / "adapters"
    make_adapter(model_dir, store / "alpha", seed=1)
    make_adapter(model_dir, store / "beta", seed=2, rank=8, alpha=16, targets=("c_attn", "c_fc"))
    settings = app_settings(model_dir, store, server={"admin_token": "T", "api_key": CLIENT_KEY})
    with live_server(settings) as (base, app):
        for name, examples in EXAMPLES.items():
            r = httpx.post(f"{base}/admin/adapters", json={"name": name, "path": name, "examples": examples},
                           headers={"Authorization": "Bearer T"}, timeout=60)
            assert r.status_code == 200, r.text
        yield ClientServer(base, app)


@contextmanager
def engine_paused(app, timeout: float = 30.0):
    """Hold the engine thread between steps (nothing is admitted or decoded) until the block exits,
    so a test can line requests up without racing the engine."""
    worker = AppHandle(app).worker
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(timeout)

    done = worker.run_soon(hold)
    if not entered.wait(timeout):
        raise RuntimeError("the engine thread did not pause")
    try:
        yield release
    finally:
        release.set()
        done.result(timeout)


def begin_shutdown(app) -> None:
    """Start a live_server's graceful shutdown from inside a test: it stops accepting connections
    while the requests in flight continue (what SIGTERM does to `switchboard serve`)."""
    app.state.uvicorn_server.should_exit = True


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def assert_abandoned_stream_cancelled(base: str, app, max_tokens: int, admin: dict[str, str]) -> None:
    """After a client dropped a stream of `max_tokens`: its row leaves the engine, it stopped
    short of `max_tokens`, and no adapter reference is left held."""
    import httpx

    engine = AppHandle(app).engine
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == []
    generated = sum(float(line.split()[-1]) for line in httpx.get(f"{base}/metrics").text.splitlines()
                    if line.startswith("switchboard_generated_tokens_total{"))
    assert generated < max_tokens  # cancelled, not run to the end
    adapters = httpx.get(f"{base}/admin/adapters", headers=admin).json()["adapters"]
    assert all(a["in_flight"] == 0 for a in adapters)
