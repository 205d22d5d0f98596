"""`switchboard serve` as a user runs it: a real process on loopback, then SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from server.local import free_port, stop_process, wait_ready


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_serve_subprocess_end_to_end(tiny_model_dir, store):
    port = free_port()
    cmd = [sys.executable, "-m", "server.commands.cli", "serve", "--base-model", str(tiny_model_dir), "--adapter-dir", str(store),
           "--admin-token", "T", "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/ready", 60, dead=lambda: None if proc.poll() is None else proc.stdout.read())
        models = {m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]}
        assert {"alpha", "beta"} <= models
        r = httpx.post(f"{base}/v1/completions", json={"model": "alpha", "prompt": "hello", "max_tokens": 4,
                                                       "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(f"{base}/admin/adapters").status_code == 401
        assert httpx.get(f"{base}/admin/adapters", headers={"Authorization": "Bearer T"}).status_code == 200
    finally:
        stop_process(proc, signal.SIGTERM, timeout=30)
    output = proc.stdout.read()
    # uvicorn shuts down gracefully; the CLI turns the SIGTERM uvicorn re-raises into exit 0
    assert proc.returncode == 0, output
    assert "Application shutdown complete" in output


def test_missing_model_names_both_ways_to_supply_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server.commands.cli", "serve", "--base-model", str(tmp_path / "no-such-model"),
                           "--adapter-dir", str(tmp_path / "store")], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Hugging Face cache" in proc.stderr and "--base-model /path/to/folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_default_gpt2_offline_gives_clear_error(tmp_path):
    env = {**_env(), "HF_HOME": str(tmp_path / "empty-cache")}
    proc = subprocess.run([sys.executable, "-m", "server.commands.cli", "serve", "--adapter-dir", str(tmp_path / "store")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "'gpt2'" in proc.stderr and "Hugging Face cache" in proc.stderr


def test_flags_and_env_reach_settings(monkeypatch):
    import argparse

    from server.commands.cli import (
        _add_flags,
        main,  # noqa: F401  (the parser is what is under test)
        settings_from_args,
    )

    monkeypatch.setenv("SWITCHBOARD_MAX_LORAS", "3")
    monkeypatch.setenv("SWITCHBOARD_REROUTE_EVERY", "5")
    parser = argparse.ArgumentParser()
    _add_flags(parser)
    s = settings_from_args(parser.parse_args(["--reroute-every", "4", "--max-batch-size", "7", "--no-scan-on-start"]))
    assert s.engine.max_loras == 3  # from the environment
    assert s.routing.reroute_every == 4  # the flag wins over the environment
    assert s.engine.max_batch_size == 7 and s.store.scan_on_start is False
    assert s.server.host == "127.0.0.1" and s.server.admin_token is None


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_bad_chat_template_refuses_to_start(tmp_path, tiny_model_dir, command):
    """Refused before the model loads or the demo trains anything: one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "server.commands.cli", command, "--base-model", str(tiny_model_dir),
                           "--adapter-dir", str(tmp_path / "store"), "--chat-template", str(tmp_path / "missing.jinja")],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--chat-template" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())  # the demo trained nothing
