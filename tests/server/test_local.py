"""`server.local`: the free-port and wait-for-ready helpers the live tests and the benchmarks share."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from server.local import NotReady, free_port, is_ready, wait_ready


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.send_response(200 if self.path == "/ready" else 503)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_wait_ready_answers_on_200_only() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert wait_ready(f"{base}/ready", timeout=10) >= 0
        assert not is_ready(f"{base}/busy")  # a 503 is not ready
        with pytest.raises(NotReady, match="within 0 s"):
            wait_ready(f"{base}/busy", timeout=0.3, interval=0.05)
    finally:
        server.shutdown()
        server.server_close()


def test_a_dead_server_ends_the_wait_at_once() -> None:
    url = f"http://127.0.0.1:{free_port()}/ready"  # nothing listens there
    assert not is_ready(url)
    with pytest.raises(NotReady, match="exit code 3"):
        wait_ready(url, timeout=60, dead=lambda: "exit code 3")
