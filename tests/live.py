"""A real uvicorn server on 127.0.0.1 in a background thread, for tests that need concurrency,
disconnects or shutdown (TestClient serialises requests and cannot drop a connection)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from server.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("live server did not become ready")
        time.sleep(0.1)
    try:
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def engine_paused(app, timeout: float = 30.0):
    """Hold the engine thread between steps (nothing is admitted or decoded) until the block exits,
    so a test can line requests up without racing the engine."""
    worker = app.state.switchboard.services.worker
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


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
