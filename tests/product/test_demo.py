"""`switchboard demo` as a new user runs it: a fresh folder, a local base model, `--quick`.

The first run trains the starter adapters from the data shipped in the package and ends serving
`auto` over them; the second run finds them and trains nothing. Nothing outside the repository is read: the
process runs in an empty temporary folder with the repository only on its import path.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.local import free_port, stop_process, wait_ready
from tests.paths import REPO, pyproject
from training.data import DataError, load_dataset, starter_names


def _run_demo(cwd: Path, model_dir: Path, port: int) -> tuple[str, dict, dict]:
    """Start the demo, wait until it serves, send one routed completion, stop it; returns
    (output, /v1/models by id, the completion)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "server.commands.cli", "demo", "--base-model", str(model_dir), "--quick", "--port", str(port),
           "--device", "cpu", "--torch-threads", "1"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/ready", 400, interval=0.5,
                   dead=lambda: None if proc.poll() is None else (proc.stdout.read() if proc.stdout else ""))
        models = {m["id"]: m for m in httpx.get(f"{base}/v1/models").json()["data"]}
        r = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "model": "auto", "prompt": "def fibonacci(n):", "max_tokens": 6, "temperature": 0,
            "routing": {"reroute_every": 2}})
        assert r.status_code == 200, r.text
        completion = r.json()
    finally:
        stop_process(proc, signal.SIGINT, timeout=30)
    output = proc.stdout.read() if proc.stdout else ""
    return output, models, completion


def _weights_files(store: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in store.glob("*/adapter_model.safetensors")}


@pytest.mark.slow
def test_demo_trains_then_serves_routed_and_a_second_run_trains_nothing(tmp_path, tiny_model_dir):
    work = tmp_path / "fresh"
    work.mkdir()
    assert not (work.parent / "shared").exists()
    store = work / "adapters"  # the default --adapter-dir, relative to where the user runs it

    output, models, completion = _run_demo(work, tiny_model_dir, free_port())
    assert "Training 3 starter adapters" in output, output
    routable = sorted(n for n, m in models.items() if m.get("routable"))
    assert routable == ["code", "math", "prose"], models
    trace = completion["choices"][0]["routing"]
    assert trace and len(trace[0]["weights"]) >= 2 and set(trace[0]["weights"]) <= set(routable), trace
    assert completion["usage"]["completion_tokens"] == 6
    assert "/playground" in output and "curl -s" in output and "from openai import OpenAI" in output
    for name in routable:
        meta = json.loads((store / name / "switchboard.json").read_text())
        assert meta["training"]["steps"] > 0 and meta["domain"] == name
        assert (store / name / "centroid.safetensors").is_file() and (store / name / "examples.jsonl").is_file()
    trained = _weights_files(store)

    output2, models2, completion2 = _run_demo(work, tiny_model_dir, free_port())
    assert "Training" not in output2 and "nothing to train" in output2, output2
    assert _weights_files(store) == trained  # nothing rewritten
    assert sorted(n for n, m in models2.items() if m.get("routable")) == routable
    assert len(completion2["choices"][0]["routing"][0]["weights"]) >= 2


def test_demo_without_a_base_model_names_both_ways(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "HF_HOME": str(tmp_path / "empty-cache")}
    proc = subprocess.run([sys.executable, "-m", "server.commands.cli", "demo", "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "'gpt2'" in proc.stderr and "Hugging Face cache" in proc.stderr and "--base-model" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())


def test_starter_data_ships_with_sources_and_loads_by_name():
    assert starter_names() == ["code", "math", "prose"]
    folder = REPO / "training" / "starter_data"
    readme = (folder / "README.md").read_text()
    total = 0
    for name in starter_names():
        path = folder / f"{name}.jsonl"
        total += path.stat().st_size
        assert f"`{name}.jsonl`" in readme
        ds = load_dataset(f"starter:{name}", val_fraction=0.1)
        assert len(ds.train) >= 200 and ds.validation
        assert all(ex.text.strip() for ex in ds.all)
    assert total < 600 * 1024  # a few hundred KB: it rides in the wheel
    assert "MIT License" in readme and "PSF License" in readme and "public domain" in readme
    with pytest.raises(DataError, match="starter:code"):
        load_dataset("starter:nope")


def test_starter_data_is_package_data():

    cfg = pyproject()
    patterns = cfg["tool"]["setuptools"]["package-data"]["training"]
    folder = REPO / "training"
    shipped = {p.relative_to(folder).as_posix() for pat in patterns for p in folder.glob(pat)}
    assert {"starter_data/code.jsonl", "starter_data/prose.jsonl", "starter_data/math.jsonl",
            "starter_data/README.md"} <= shipped


def _settings(model_dir: Path, store: Path):
    from tests.tiny import app_settings

    return app_settings(model_dir, store)


def test_store_with_routable_user_adapters_trains_nothing(store, tiny_model_dir, caplog):
    from server.commands.demo import prepare_store, routable_adapters
    from server.engine.base_model import load_base_model

    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    assert routable_adapters(store, resident, "base") == []  # alpha, beta: no centroid, no examples
    (store / "alpha" / "examples.jsonl").write_text(json.dumps({"prompt": "def f(): pass"}) + "\n")
    assert routable_adapters(store, resident, "base") == ["alpha"]
    with caplog.at_level(logging.INFO, logger="server.commands.demo"):
        assert prepare_store(_settings(tiny_model_dir, store), resident, quick=True) == ["alpha"]
    assert "nothing to train" in caplog.text
    # trained for another base model: not routable here, whatever it carries
    (store / "alpha" / "switchboard.json").write_text(json.dumps({"base_fingerprint": "0" * 64}))
    assert routable_adapters(store, resident, "base") == []


def test_starter_name_taken_by_an_unroutable_adapter_is_not_overwritten(store, tiny_model_dir):
    from server.commands.demo import prepare_store
    from server.engine.base_model import load_base_model

    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    (store / "alpha").rename(store / "code")
    before = (store / "code" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="--adapter-dir"):
        prepare_store(_settings(tiny_model_dir, store), resident, quick=True)
    assert (store / "code" / "adapter_model.safetensors").read_bytes() == before


def test_interrupted_first_run_trains_only_the_missing_starters(store, tiny_model_dir, monkeypatch):
    """An interrupted first run leaves some starters; the next run trains the rest, not all three
    (the trainer is replaced by a copy of an existing adapter: what is under test is the choice)."""
    import shutil

    import training.starter
    from server.commands.demo import prepare_store
    from server.engine.base_model import load_base_model
    from server.store.manifest import Manifest

    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    (store / "alpha").rename(store / "code")
    (store / "code" / "examples.jsonl").write_text(json.dumps({"prompt": "def f(): pass"}) + "\n")
    shutil.rmtree(store / "beta")
    Manifest(store).set_adapter("code", "code", False)  # the first run's server wrote its manifest
    calls = []

    def fake_train(dest, base_model, *, names, **kw):
        calls.append(names)
        for n in names:
            shutil.copytree(dest / "code", dest / n)

    monkeypatch.setattr(training.starter, "train_starters", fake_train)
    assert prepare_store(_settings(tiny_model_dir, store), resident, quick=True) == ["code", "math", "prose"]
    assert calls == [["prose", "math"]]
    assert set(Manifest(store).adapters) == {"code", "prose", "math"}  # restored at start
