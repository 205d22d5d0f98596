"""Starting a server on this machine, knowing when it is up and stopping it: a free port on
127.0.0.1, a wait for `/ready`, and a signal with a kill behind it. Used by the benchmarks and the tests that run a real server (uvicorn in a
thread or `switchboard serve` in a subprocess).

Standard library only (the server itself needs no HTTP client), and proxies are bypassed: the
probe always talks to the local address it is given.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable


class NotReady(RuntimeError):
    """The server died or did not answer `200` on its readiness URL in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race with another process is
    possible but harmless for local tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def is_ready(url: str, timeout: float = 2.0) -> bool:
    """Whether GET `url` answers 200 now."""
    try:
        with _opener.open(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):  # refused, reset, timed out, or an HTTP error status
        return False


def wait_ready(url: str, timeout: float, *, dead: Callable[[], str | None] | None = None,
               interval: float = 0.2) -> float:
    """Poll `url` until it answers 200; returns the seconds waited.

    `dead()` is asked before each try: it returns None while the server is alive, or why it is
    not (an exit code, a log tail), which ends the wait at once instead of at the deadline.
    """
    start = time.monotonic()
    while True:
        reason = dead() if dead is not None else None
        if reason is not None:
            raise NotReady(f"the server stopped before it was ready at {url}: {reason}")
        if is_ready(url):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise NotReady(f"the server was not ready at {url} within {timeout:.0f} s")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
    """Send `sig` (a graceful stop) to a server subprocess that is still running, and kill it if it
    has not exited within `timeout` seconds; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode
