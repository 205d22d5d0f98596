"""Hundreds of adapters on a tiny model: indexed at start (factors read on first use), a host
memory budget with the store as the disk tier (LRU out, read again on demand), pinned adapters
never leaving, and a clear 503 when nothing can make room."""

from __future__ import annotations

import os
import time

import pytest
from fastapi.testclient import TestClient

from bench.many_adapters import write_store
from server.app import create_app
from server.state import app_state
from tests.conftest import ADMIN
from tests.tiny import TINY_CONFIG, app_settings

N = 300


@pytest.fixture()
def many(tmp_path):
    store = tmp_path / "adapters"
    names = write_store(store, N, TINY_CONFIG["n_layer"], TINY_CONFIG["n_embd"], rank=2, distinct_files=N)
    return store, names


def _complete(client, model: str) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _states(client) -> dict[str, str]:
    return {m["id"]: m.get("load_state") for m in client.get("/v1/models").json()["data"] if "load_state" in m}


def test_lazy_start_lru_to_disk_and_back(many, tiny_model_dir):
    store, names = many
    settings = app_settings(tiny_model_dir, store, store={"max_cpu_adapters": 4},
                            engine={"max_loras": 2})
    t = time.perf_counter()
    with TestClient(create_app(settings)) as client:
        started = time.perf_counter() - t
        host = app_state(client.app).registry.host
        states = _states(client)
        assert len(states) == N and set(states.values()) == {"disk"}  # all registered, none read yet
        assert len(host) == 0 and host.loads == 0
        first = {name: _complete(client, name) for name in names[:10]}
        assert host.loads == 10 and len(host) <= 4 and host.evictions >= 6  # the budget held
        states = _states(client)
        assert sum(s != "disk" for s in states.values()) <= 4 + 2  # host budget + what the slots alias
        assert states[names[0]] == "disk"  # least recently used: back on disk
        assert _complete(client, names[0]) == first[names[0]]  # read again from disk, same factors
        assert host.loads == 11
        # a mixture of adapters that were evicted serves too
        r = client.post("/v1/completions", json={"model": "auto", "prompt": "hello", "max_tokens": 2,
                                                 "routing": {"weights": {names[1]: 0.5, names[2]: 0.5}}})
        assert r.status_code == 200, r.text
    assert started < 60  # generous: the shared CI machine; the point is that 300 folders are not read


def test_pinned_never_leave_and_full_host_refuses_clearly(many, tiny_model_dir):
    store, names = many
    settings = app_settings(tiny_model_dir, store, store={"max_cpu_adapters": 2})
    with TestClient(create_app(settings)) as client:
        host = app_state(client.app).registry.host
        for pin in ("p0", "p1"):
            r = client.post("/admin/adapters", json={"name": pin, "path": names[0], "pinned": True}, headers=ADMIN)
            assert r.status_code == 200, r.text
        pinned_text = _complete(client, "p0")
        r = client.post("/v1/completions", json={"model": names[5], "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert "host memory for adapters is full" in err["message"] and "--max-cpu-adapters" in err["message"]
        # a third pinned adapter cannot be held either: refused, the registry unchanged
        r = client.post("/admin/adapters", json={"name": "p2", "path": names[1], "pinned": True}, headers=ADMIN)
        assert r.status_code == 503 and "p2" not in _states(client)
        # an unpinned registration still works: it goes straight back to disk
        r = client.post("/admin/adapters", json={"name": "u", "path": names[1]}, headers=ADMIN)
        assert r.status_code == 200 and _states(client)["u"] == "disk"
        for _ in range(3):  # the pinned ones keep serving, and never leave
            assert _complete(client, "p0") == pinned_text
        assert {_states(client)[p] for p in ("p0", "p1")} <= {"host", "slot"} and len(host) == 2
        # once one is unpinned (removed), the others load again
        assert client.delete("/admin/adapters/p1", headers=ADMIN).status_code == 200
        _complete(client, names[5])


def test_changed_file_is_refused_not_served(many, tiny_model_dir):
    store, names = many
    with TestClient(create_app(app_settings(tiny_model_dir, store))) as client:
        weights = store / names[3] / "adapter_model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data)  # same bytes, new modification time: not the file that was indexed
        os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
        r = client.post("/v1/completions", json={"model": names[3], "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 400 and "changed on disk" in r.json()["error"]["message"], r.text
        _complete(client, names[4])  # the rest serve
