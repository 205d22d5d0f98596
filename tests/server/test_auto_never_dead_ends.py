"""`model: "auto"` on stores that used to dead-end: adapters trained without centroids route (a
centroid is computed at load from their examples.jsonl), /v1/models says which adapters `auto`
reaches, and a store with nothing routable answers a 400 that names the command that fixes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from router_core.artifacts import load_centroids, save_centroids
from server.app import create_app
from tests.conftest import ADMIN
from tests.tiny import app_settings

CODE = ["def add(a, b): return a + b", "import os\nfor f in os.listdir('.'): print(f)", "class Stack: pass"]
PROSE = ["It was a dark and stormy night.", "She walked along the river at dawn.", "The old house stood alone."]


def _examples(folder: Path, prompts: list[str]) -> None:
    """What `switchboard-train` writes beside an adapter."""
    with (folder / "examples.jsonl").open("w") as fh:
        for p in prompts:
            fh.write(json.dumps({"prompt": p, "completion": "", "source": "test", "query": p}) + "\n")


def _client(tiny_model_dir: Path, store: Path) -> TestClient:
    return TestClient(create_app(app_settings(tiny_model_dir, store)))


def _models(client: TestClient) -> dict[str, dict]:
    return {m["id"]: m for m in client.get("/v1/models").json()["data"]}


def test_examples_without_centroid_get_one_at_load_and_auto_routes(store, tiny_model_dir):
    _examples(store / "alpha", CODE)
    _examples(store / "beta", PROSE)
    assert not (store / "alpha" / "centroid.safetensors").exists()
    with _client(tiny_model_dir, store) as client:
        models = _models(client)
        assert models["alpha"]["routable"] is True and models["beta"]["routable"] is True
        r = client.post("/v1/completions", json={"model": "auto", "prompt": CODE[0], "max_tokens": 4,
                                                 "temperature": 0, "routing": {"reroute_every": 2}})
        assert r.status_code == 200, r.text
        trace = r.json()["choices"][0]["routing"]
        assert trace and set(trace[0]["weights"]) == {"alpha", "beta"}
        assert abs(sum(trace[0]["weights"].values()) - 1) < 1e-5
        described = {a["name"]: a for a in client.get("/admin/adapters", headers=ADMIN).json()["adapters"]}
        # every example prompt is a centroid row (up to 64; the router votes once there are 20)
        assert described["alpha"]["centroids"] == [3, 64] and described["alpha"]["centroid_embedder"] == "base:32"
    # saved beside the adapter, so the next start reads it instead of recomputing
    centroid, embedder = load_centroids(store / "alpha" / "centroid.safetensors")
    assert embedder == "base:32" and tuple(centroid.shape) == (3, 64)
    # the two adapters' example prompts differ, so their centroids do too
    other, _ = load_centroids(store / "beta" / "centroid.safetensors")
    assert not torch.allclose(centroid, other)


def test_centroid_for_another_embedder_is_recomputed_in_memory_and_left_on_disk(store, tiny_model_dir):
    foreign = torch.nn.functional.normalize(torch.randn(1, 384), dim=-1)
    save_centroids(store / "alpha" / "centroid.safetensors", foreign, "minilm:all-MiniLM-L6-v2")
    before = (store / "alpha" / "centroid.safetensors").read_bytes()
    _examples(store / "alpha", CODE)
    with _client(tiny_model_dir, store) as client:
        models = _models(client)
        assert models["alpha"]["routable"] is True and models["beta"]["routable"] is False
        r = client.post("/v1/completions", json={"model": "auto", "prompt": "x = 1", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert set(r.json()["choices"][0]["routing"][0]["weights"]) == {"alpha"}
    assert (store / "alpha" / "centroid.safetensors").read_bytes() == before


@pytest.mark.parametrize("kind", ["not json", "lone surrogate", "no prompts", "symlink out", "folder", "not utf-8"])
def test_broken_examples_file_serves_the_adapter_unrouted(store, tiny_model_dir, tmp_path, kind):
    path = store / "alpha" / "examples.jsonl"
    if kind == "not json":
        path.write_text("{not json\n")
    elif kind == "lone surrogate":
        path.write_text('{"prompt": "\\ud800 x"}\n')
    elif kind == "no prompts":
        path.write_text('{"completion": "only"}\n[1, 2]\n')
    elif kind == "symlink out":
        outside = tmp_path / "secret.jsonl"
        outside.write_text(json.dumps({"prompt": "outside the store"}) + "\n")
        path.symlink_to(outside)
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with _client(tiny_model_dir, store) as client:
        assert _models(client)["alpha"]["routable"] is False
        r = client.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert not (store / "alpha" / "centroid.safetensors").exists()


def test_adapters_without_centroid_or_examples_name_the_admin_call(store, tiny_model_dir):
    with _client(tiny_model_dir, store) as client:
        assert {n: m.get("routable") for n, m in _models(client).items() if n in ("alpha", "beta")} == \
            {"alpha": False, "beta": False}
        r = client.post("/v1/completions", json={"model": "auto", "prompt": "x"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "no_routable_adapters" and err["param"] == "model"
        assert "alpha has no centroid" in err["message"] and "/admin/adapters" in err["message"]
        body = err["message"].split("-d '", 1)[1].split("'", 1)[0]
        assert json.loads(body)["name"] == "alpha"  # the quoted request body is valid JSON
        # ... and following it makes `auto` route
        r = client.post("/admin/adapters", headers=ADMIN,
                        json={"name": "alpha", "path": "alpha", "examples": CODE})
        assert r.status_code == 200, r.text
        assert client.post("/v1/completions", json={"model": "auto", "prompt": "x", "max_tokens": 1}).status_code == 200


def test_empty_store_names_the_demo_and_starter_training(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    with _client(tiny_model_dir, empty) as client:
        r = client.post("/v1/completions", json={"model": "auto", "prompt": "x"})
        assert r.status_code == 400
        msg = r.json()["error"]["message"]
        assert f"switchboard demo --base-model {tiny_model_dir} --adapter-dir {empty}" in msg
        assert "--data starter:code" in msg and "/admin/reload" in msg
