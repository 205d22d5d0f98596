"""A real uvicorn server on 127.0.0.1 in a background thread, for tests that need concurrency,
disconnects or shutdown (TestClient serialises requests and cannot drop a connection)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

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
