"""A real Prometheus scrapes a real `switchboard serve` with the project's scrape config.

The server runs as a subprocess on a tiny model (tests/tiny.py) with two adapters registered
through the admin API (with example texts, so the centroid router can route `model: "auto"`).
Prometheus (Debian's package; `.ci/run` installs it) runs with docker/prometheus/prometheus.yml,
its targets rewritten to the test server on 127.0.0.1 and a 1 s scrape interval. The test then
asks Prometheus' HTTP API for the routing, request and token counters until they carry the right
`adapter` labels and the values the server's own /metrics reports. Everything is bounded in
time and both processes are always stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.local import NotReady, free_port, stop_process, wait_ready
from tests.paths import REPO
from tests.tiny import make_adapter

PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "switchboard.json"
COMPOSE_TARGET = "switchboard:8000"
TOKEN = "scrape-test-token"
START_TIMEOUT = 90.0  # server: import torch, load the tiny model
SCRAPE_TIMEOUT = 60.0  # Prometheus: start, first scrapes, series queryable
QUERIED = ("switchboard_route_decisions_total", "switchboard_requests_total", "switchboard_generated_tokens_total")

# Each adapter's examples are the prompt sent to it, so the prompt's routing decision picks it.
EXAMPLES = {
    "alpha": "def add(a, b):\n    return a + b\n",
    "beta": "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
}


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or next(
        (p for p in ("/usr/bin/prometheus", "/usr/local/bin/prometheus") if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip("the `prometheus` binary is not installed (Debian: `apt-get install -y prometheus`; "
                    ".ci/run installs it), so the real scrape test cannot run here")
    return found


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    try:
        wait_ready(url, timeout, dead=lambda: None if proc.poll() is None else f"exit code {proc.returncode}",
                   interval=0.25)
    except NotReady as e:
        pytest.fail(f"{what}: {e}\n{tail(log)}")


def scrape_config(server_port: int, prometheus_dir: Path) -> Path:
    """The project's prometheus.yml with the switchboard job pointed at the test server."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = [job for job in config["scrape_configs"]
            if any(COMPOSE_TARGET in sc.get("targets", []) for sc in job.get("static_configs", []))]
    assert len(jobs) == 1, f"{PROMETHEUS_CONFIG} must have one job scraping {COMPOSE_TARGET}"
    job = jobs[0]
    for sc in job["static_configs"]:
        sc["targets"] = [f"127.0.0.1:{server_port}" if t == COMPOSE_TARGET else t for t in sc["targets"]]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"] = [job]  # the other jobs (the GPU service) have no server here
    for key in ("rule_files", "alerting", "remote_write", "remote_read"):
        config.pop(key, None)
    path = prometheus_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def server_values(base: str) -> dict[str, dict[frozenset, float]]:
    """{metric: {labels: value}} from the server's own /metrics, for the queried counters."""
    text = httpx.get(f"{base}/metrics", timeout=5).text
    out: dict[str, dict[frozenset, float]] = {name: {} for name in QUERIED}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name][frozenset(sample.labels.items())] = sample.value
    return out


def prometheus_values(prom: str, metric: str, port: int) -> dict[frozenset, float] | None:
    """{labels: value} as Prometheus answers an instant query, without its target labels."""
    r = httpx.get(f"{prom}/api/v1/query", params={"query": metric}, timeout=5)
    body = r.json()
    if body.get("status") != "success":
        return None
    out = {}
    for series in body["data"]["result"]:
        labels = dict(series["metric"])
        assert labels.pop("__name__") == metric
        assert labels.pop("instance") == f"127.0.0.1:{port}", series
        assert labels.pop("job") == "switchboard", series
        labels.pop("image", None)  # the static label of the compose job
        out[frozenset(labels.items())] = float(series["value"][1])
    return out


def complete(base: str, model: str, prompt: str) -> dict:
    r = httpx.post(f"{base}/v1/completions", timeout=60,
                   json={"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard, its variables filled in."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]
    return [e.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*") for e in exprs]


def test_prometheus_scrapes_routing_metrics(tmp_path, tiny_model_dir):
    prometheus = prometheus_binary()
    store = tmp_path / "adapters"
    store.mkdir()
    make_adapter(tiny_model_dir, store / "alpha", seed=1, rank=4, targets=("c_attn", "c_proj"))
    make_adapter(tiny_model_dir, store / "beta", seed=2, rank=8, alpha=16, targets=("c_attn", "c_fc"))
    port, prom_port = free_port(), free_port()
    base, prom = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    server_log, prom_log = tmp_path / "server.log", tmp_path / "prometheus.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("SWITCHBOARD_")}  # flags only
    server = prom_proc = None
    t0 = time.monotonic()
    try:
        with server_log.open("wb") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "server.commands.cli", "serve", "--base-model", str(tiny_model_dir),
                 "--adapter-dir", str(store), "--host", "127.0.0.1", "--port", str(port),
                 "--admin-token", TOKEN, "--embedder", "base", "--no-scan-on-start", "--log-level", "warning"],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for(f"{base}/ready", server, server_log, START_TIMEOUT, "switchboard serve")
        print(f"server ready after {time.monotonic() - t0:.1f} s")

        auth = {"Authorization": f"Bearer {TOKEN}"}
        for name, example in EXAMPLES.items():
            r = httpx.post(f"{base}/admin/adapters", headers=auth, timeout=60,
                           json={"name": name, "path": name, "examples": [example]})
            assert r.status_code == 200, r.text
            assert r.json()["adapter"]["centroids"] is not None, r.text

        for name, prompt in EXAMPLES.items():  # routed: the prompt's decision picks its own adapter
            body = complete(base, "auto", prompt)
            first = body["choices"][0]["routing"][0]["weights"]
            assert max(first, key=first.get) == name, body
        complete(base, "alpha", "for i in range(10):")  # fixed adapters
        complete(base, "beta", "Mr. Holmes looked at the letter")

        expected = server_values(base)
        decided = {dict(k)["adapter"] for k in expected["switchboard_route_decisions_total"]}
        assert {"alpha", "beta"} <= decided, expected
        assert {dict(k)["adapter"] for k in expected["switchboard_generated_tokens_total"]} >= {"alpha", "beta"}
        assert {dict(k)["model"] for k in expected["switchboard_requests_total"]} == {"auto", "alpha", "beta"}

        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        config = scrape_config(port, prom_dir)
        check = subprocess.run([shutil.which("promtool") or "promtool", "check", "config", str(config)],
                               capture_output=True, text=True) if shutil.which("promtool") else None
        assert check is None or check.returncode == 0, check.stdout + check.stderr
        with prom_log.open("wb") as out:
            prom_proc = subprocess.Popen(
                [prometheus, f"--config.file={config}", f"--storage.tsdb.path={prom_dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                cwd=prom_dir, stdout=out, stderr=subprocess.STDOUT)
        wait_for(f"{prom}/-/ready", prom_proc, prom_log, SCRAPE_TIMEOUT, "prometheus")
        print(f"prometheus ready after {time.monotonic() - t0:.1f} s")

        scrape_start = time.monotonic()
        deadline = scrape_start + SCRAPE_TIMEOUT
        got: dict[str, dict[frozenset, float] | None] = {}
        while True:
            expected = server_values(base)
            got = {metric: prometheus_values(prom, metric, port) for metric in QUERIED}
            if got == expected:
                break
            if time.monotonic() > deadline:
                up = httpx.get(f"{prom}/api/v1/query", params={"query": "up"}, timeout=5).text
                targets = httpx.get(f"{prom}/api/v1/targets", timeout=5).text
                pytest.fail(f"Prometheus did not report the server's values within {SCRAPE_TIMEOUT:.0f} s.\n"
                            f"server: {expected}\nprometheus: {got}\nup: {up}\ntargets: {targets}\n"
                            f"prometheus log:\n{tail(prom_log)}")
            time.sleep(0.5)

        print(f"prometheus matched the server after {time.monotonic() - scrape_start:.1f} s: "
              + json.dumps({m: {",".join(f"{k}={v}" for k, v in sorted(ls)): val for ls, val in series.items()}
                            for m, series in got.items()}, sort_keys=True))
        by_adapter = {dict(k)["adapter"]: v for k, v in got["switchboard_route_decisions_total"].items()}
        assert by_adapter["alpha"] >= 1 and by_adapter["beta"] >= 1
        assert {dict(k)["router"] for k in got["switchboard_route_decisions_total"]} == {"centroid"}

        # The Grafana dashboard's queries are valid PromQL for this Prometheus.
        for expr in dashboard_queries():
            r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
            assert r.status_code == 200 and r.json()["status"] == "success", (expr, r.text)
        tokens = httpx.get(f"{prom}/api/v1/query", timeout=5, params={
            "query": "sum by (adapter) (switchboard_generated_tokens_total)"}).json()["data"]["result"]
        assert {s["metric"]["adapter"] for s in tokens} >= {"alpha", "beta"}
    finally:
        for proc in (prom_proc, server):
            if proc is not None:
                stop_process(proc, timeout=15)
