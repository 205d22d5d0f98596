"""SIGTERM with a request in flight: the server stops accepting, lets the stream finish (bounded by
`--shutdown-grace`) and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx

from server.local import free_port, stop_process, wait_ready


def test_sigterm_drains_in_flight_stream_and_exits_0(long_model_dir, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "server.commands.cli", "serve", "--base-model", str(long_model_dir),
           "--adapter-dir", str(tmp_path / "store"), "--port", str(port), "--device", "cpu", "--shutdown-grace", "60"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    chunks: list[dict] = []
    first = threading.Event()
    done: dict = {}

    def stream() -> None:
        body = {"model": "base", "prompt": "hello", "max_tokens": 60, "temperature": 0, "stream": True,
                "ignore_eos": True}
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done["done"] = True
                    elif line.startswith("data: "):
                        chunks.append(json.loads(line[6:]))
                        first.set()
        except httpx.HTTPError as e:
            done["error"] = repr(e)
        first.set()

    try:
        wait_ready(f"{base}/ready", 60, dead=lambda: None if proc.poll() is None else proc.stdout.read())
        client = threading.Thread(target=stream)
        client.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        client.join(120)
        assert proc.wait(timeout=120) == 0
    finally:
        stop_process(proc, signal.SIGKILL, timeout=10)
    output = proc.stdout.read()
    assert "error" not in done, (done, output[-2000:])
    assert done.get("done"), output[-2000:]
    tokens = sum(1 for c in chunks if c["choices"][0].get("text") is not None and "error" not in c)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
    assert tokens >= 60 - 1  # every token arrived (the last chunk may carry only the finish reason)
    assert "Waiting for connections to close" in output or "Application shutdown complete" in output
