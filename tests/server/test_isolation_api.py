"""Regression tests for the fuzzing report's defects (issue: one request never harms another):
every reproduction is a clear 4xx in the OpenAI error shape, refused adapters and routers leave
the registry as it was, bad store files are reported under `failed` and never abort a scan or
the start-up, and no request leaves an adapter reference behind."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.conftest import ADMIN
from tests.tiny import app_settings, make_adapter


def _error(r, status: int | tuple[int, ...]) -> dict:
    assert r.status_code in ((status,) if isinstance(status, int) else status), (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _in_flight(client) -> dict[str, int]:
    return {a["name"]: a["in_flight"] for a in client.get("/admin/adapters", headers=ADMIN).json()["adapters"]}


def _registry(client) -> dict[str, int]:
    return {a["name"]: a["version"] for a in client.get("/admin/adapters", headers=ADMIN).json()["adapters"]}


def post_raw(client, path: str, body: dict, **kw):
    """POST `body` as ASCII JSON (lone surrogates escaped as `\\ud800`, as a hostile client sends them)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json", **kw})


HI = {"model": "base", "prompt": "hi", "max_tokens": 4}
REPRODUCTIONS = [  # (body, status, param) from the fuzzing report, defects 1-3 and 5
    ({**HI, "temperature": 1e-300}, 400, "temperature"),
    ({**HI, "top_p": 1e-300}, 400, "top_p"),
    ({**HI, "model": "auto", "routing": {"weights": {"alpha": 1e30}}, "temperature": 1}, 400, "routing.weights"),
    ({**HI, "model": "auto", "routing": {"weights": {"alpha": 1e300, "beta": 1}}}, 400, "routing.weights"),
    ({**HI, "model": "alpha", "seed": 2**64, "temperature": 1}, 400, "seed"),
    ({**HI, "model": "alpha", "seed": -1, "temperature": 1}, 400, "seed"),
    ({**HI, "logit_bias": {"²": 1}}, 400, "logit_bias"),
    ({**HI, "logit_bias": {"1" * 5000: 1}}, 400, "logit_bias"),
    ({**HI, "prompt": "\ud800"}, 400, "prompt"),
    ({**HI, "prompt": ["ok", "x\udfff"]}, 400, "prompt"),
    ({**HI, "stop": ["s" * 257]}, 400, "stop"),
    ({**HI, "stop": "\ud800"}, 400, "stop"),
    ({**HI, "prompt": ["p"] * 257}, 413, "prompt"),
]


@pytest.mark.parametrize(("body", "status", "param"), REPRODUCTIONS,
                         ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(REPRODUCTIONS)])
def test_reproductions_are_4xx(app_client, body, status, param):
    err = _error(post_raw(app_client, "/v1/completions", body), status)
    assert err["param"] == param
    assert set(_in_flight(app_client).values()) == {0}


def test_seed_range_edges_are_served(app_client):
    for seed in (0, 2**64 - 1):
        r = app_client.post("/v1/completions", json={**HI, "model": "alpha", "seed": seed, "temperature": 1})
        assert r.status_code == 200, r.text
    assert set(_in_flight(app_client).values()) == {0}


def test_body_over_the_limit_is_413_before_parsing(store, tiny_model_dir):
    settings = app_settings(tiny_model_dir, store, server={"max_body_bytes": 4096})
    with TestClient(create_app(settings)) as client:
        err = _error(client.post("/v1/completions", json={**HI, "prompt": "x" * 5000}), 413)
        assert "max_body_bytes" in err["message"]

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"model": "base", "prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        _error(client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
        assert client.post("/v1/completions", json=HI).status_code == 200


def test_heavy_validation_runs_off_the_event_loop(app_client, monkeypatch):
    from server.serving import completion_service as completions

    threads = []
    real = completions.build_choices

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(completions, "build_choices", spy)
    loop_thread = app_client.portal.call(lambda: threading.current_thread())
    assert app_client.post("/v1/completions", json=HI).status_code == 200
    assert threads and threads[0] is not loop_thread


def test_name_with_trailing_newline_refused(app_client):
    before = _registry(app_client)
    err = _error(app_client.post("/admin/adapters", json={"name": "evil\n", "path": "alpha"}, headers=ADMIN), 400)
    assert err["param"] == "name"
    assert _registry(app_client) == before


def test_unencodable_examples_refused(app_client):
    before = _registry(app_client)
    body = {"name": "gamma", "path": "alpha", "examples": ["fine", "bad \ud800"]}
    err = _error(post_raw(app_client, "/admin/adapters", body, **ADMIN), 400)
    assert err["param"] == "examples"
    assert _registry(app_client) == before


def test_unusable_paths_refused(app_client, store):
    before = _registry(app_client)
    os.symlink(store / "loop", store / "loop")
    for path in ("a" * 300, f"alpha/{'b' * 300}", "loop", "loop/x"):
        err = _error(app_client.post("/admin/adapters", json={"name": "gamma", "path": path}, headers=ADMIN), 400)
        assert err["param"] == "path"
    _error(app_client.post("/admin/routers", json={"name": "r", "path": "c" * 300}, headers=ADMIN), 400)
    assert _registry(app_client) == before


def _copy_adapter(store: Path, name: str) -> Path:
    import shutil

    shutil.copytree(store / "alpha", store / name)
    return store / name


def test_huge_alpha_refused_at_registration(app_client, store):
    folder = _copy_adapter(store, "loud")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 1e38}))
    before = _registry(app_client)
    err = _error(app_client.post("/admin/adapters", json={"name": "loud", "path": "loud"}, headers=ADMIN), 400)
    assert "scale" in err["message"]
    assert _registry(app_client) == before


def test_deeply_nested_config_refused(app_client, store):
    folder = _copy_adapter(store, "deep")
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    before = _registry(app_client)
    err = _error(app_client.post("/admin/adapters", json={"name": "deep", "path": "deep"}, headers=ADMIN), 400)
    assert "nested" in err["message"]
    assert _registry(app_client) == before


def test_file_symlinks_out_of_the_store_refused(app_client, store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_model.safetensors").write_bytes((store / "alpha" / "adapter_model.safetensors").read_bytes())
    weights = _copy_adapter(store, "leaky")
    (weights / "adapter_model.safetensors").unlink()
    os.symlink(outside / "adapter_model.safetensors", weights / "adapter_model.safetensors")
    config = _copy_adapter(store, "passwd")
    (config / "adapter_config.json").unlink()
    os.symlink("/etc/passwd", config / "adapter_config.json")
    before = _registry(app_client)
    for name in ("leaky", "passwd"):
        err = _error(app_client.post("/admin/adapters", json={"name": name, "path": name}, headers=ADMIN), 400)
        assert "outside the adapter store" in err["message"]
    inside = _copy_adapter(store, "linked")  # a link that stays inside the store is fine
    (inside / "adapter_model.safetensors").unlink()
    os.symlink(store / "alpha" / "adapter_model.safetensors", inside / "adapter_model.safetensors")
    assert app_client.post("/admin/adapters", json={"name": "linked", "path": "linked"}, headers=ADMIN).status_code == 200
    assert set(_registry(app_client)) == set(before) | {"linked"}


def _bad_router(store: Path, name: str, **fields) -> Path:
    from router_core.artifacts import save_router
    from router_core.mlp import MLPRouter, MLPRouterNet

    folder = store / "_routers" / name
    save_router(folder, MLPRouter(MLPRouterNet(64, 2, 0), ["alpha", "beta"], "base:64"))
    cfg = json.loads((folder / "router.json").read_text())
    (folder / "router.json").write_text(json.dumps({**cfg, **fields}))
    return folder


def test_router_with_huge_hidden_refused(app_client, store):
    _bad_router(store, "huge", hidden=2**40)
    err = _error(app_client.post("/admin/routers", json={"name": "huge"}, headers=ADMIN), 400)
    assert "hidden" in err["message"]
    routers = [r["name"] for r in app_client.get("/admin/routers", headers=ADMIN).json()["routers"]]
    assert routers == ["centroid", "arrow"]


def test_router_file_symlink_out_of_the_store_refused(app_client, store, tmp_path):
    folder = _bad_router(store, "leaky")
    (tmp_path / "router.json").write_text((folder / "router.json").read_text())
    (folder / "router.json").unlink()
    os.symlink(tmp_path / "router.json", folder / "router.json")
    err = _error(app_client.post("/admin/routers", json={"name": "leaky"}, headers=ADMIN), 400)
    assert "outside the adapter store" in err["message"]


def _hostile_store(store: Path, tiny_model_dir: Path) -> None:
    """Everything the report found in a store: a dangling symlink, a symlink loop, a deeply nested
    config, a huge-alpha adapter, a router folder with a huge `hidden` and one that is a loop."""
    os.symlink(store / "missing", store / "dangling")
    os.symlink(store / "loop", store / "loop")
    deep = _copy_adapter(store, "deep")
    (deep / "adapter_config.json").write_text("{\"a\":" * 50_000 + "1" + "}" * 50_000)
    loud = _copy_adapter(store, "loud")
    cfg = json.loads((loud / "adapter_config.json").read_text())
    (loud / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 1e38}))
    (loud / "stale").symlink_to(store / "gone")  # a dangling file inside a folder
    _bad_router(store, "huge", hidden=2**40)
    os.symlink(store / "_routers" / "rloop", store / "_routers" / "rloop")
    make_adapter(tiny_model_dir, store / "gamma", seed=5)


def test_start_up_survives_a_hostile_store(store, tiny_model_dir):
    _hostile_store(store, tiny_model_dir)
    with TestClient(create_app(app_settings(tiny_model_dir, store))) as client:
        assert client.get("/ready").status_code == 200
        assert set(_registry(client)) == {"alpha", "beta", "gamma"}
        report = client.post("/admin/reload", headers=ADMIN).json()
        assert set(report["unchanged"]) == {"alpha", "beta", "gamma"}
        assert {"deep", "loud"} <= set(report["failed"])
        assert "huge" in report["failed_routers"]


def test_reload_over_a_hostile_store_reports_and_applies_the_rest(app_client, store, tiny_model_dir):
    before = _registry(app_client)
    _hostile_store(store, tiny_model_dir)
    r = app_client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["loaded"] == ["gamma"]  # the good new folder is applied...
    assert {"deep", "loud"} <= set(report["failed"])  # ...every bad one reported, none fatal
    assert "nested" in report["failed"]["deep"] and "scale" in report["failed"]["loud"]
    assert "huge" in report["failed_routers"]
    assert _registry(app_client) == {**before, "gamma": _registry(app_client)["gamma"]}


def test_unloaded_adapters_label_series_are_removed(app_client):
    for model in ("alpha", "beta"):
        assert app_client.post("/v1/completions", json={**HI, "model": model}).status_code == 200
    text = app_client.get("/metrics").text
    assert 'adapter="alpha"' in text and 'model="alpha"' in text
    assert app_client.delete("/admin/adapters/alpha", headers=ADMIN).status_code == 200
    text = app_client.get("/metrics").text
    assert 'adapter="alpha"' not in text and 'model="alpha"' not in text
    assert 'adapter="beta"' in text  # the others stay
