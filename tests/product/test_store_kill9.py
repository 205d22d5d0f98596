"""An acknowledged registration survives kill -9 (issue 23, "done when"): the store's writes are
fsynced before the admin API answers, so a server killed the moment its answers arrived leaves a
manifest (snapshot + journal) that holds every change it acknowledged, and no temporary file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from server.local import free_port, stop_process, wait_ready
from server.store.manifest import Manifest
from tests.conftest import ADMIN
from tests.paths import REPO

EXAMPLES = ["def add(a, b): return a + b", "for i in range(10): print(i)"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_acknowledged_registration_survives_kill_9(tiny_model_dir, store):
    port = free_port()
    cmd = [sys.executable, "-m", "server.commands.cli", "serve", "--base-model", str(tiny_model_dir),
           "--adapter-dir", str(store), "--admin-token", "T", "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/ready", 90, dead=lambda: None if proc.poll() is None else proc.stdout.read())
        r = httpx.post(f"{base}/admin/adapters", json={"name": "gamma", "path": "beta", "examples": EXAMPLES},
                       headers=ADMIN, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.delete(f"{base}/admin/adapters/alpha", headers=ADMIN, timeout=60)
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGKILL)  # the moment the answers arrived: no shutdown, no flush
        proc.wait(timeout=30)
    finally:
        stop_process(proc, signal.SIGKILL, timeout=10)
    manifest = Manifest(store)
    assert set(manifest.adapters) == {"beta", "gamma"}
    assert (store / manifest.adapters["gamma"]["centroid"]).is_file()
    assert not [p for p in store.rglob("*") if p.name.endswith((".tmp", ".bak"))]
