"""Admin API: auth, load/list/unload, vLLM aliases, and every refused adapter leaving the registry as it was."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from server.app import create_app
from tests.conftest import ADMIN
from tests.tiny import app_settings, make_adapter, save_model


def _models(client) -> list[str]:
    return sorted(m["id"] for m in client.get("/v1/models").json()["data"])


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_admin_needs_token(app_client):
    assert _error(app_client.get("/admin/adapters"), 401)["type"] == "authentication_error"
    assert _error(app_client.get("/admin/adapters", headers={"Authorization": "Bearer wrong"}), 403)
    assert _error(app_client.post("/admin/adapters", json={"name": "x", "path": "alpha"}), 401)
    assert _error(app_client.delete("/admin/adapters/alpha"), 401)
    assert _error(app_client.post("/admin/reload"), 401)
    assert _error(app_client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "alpha"}), 401)
    assert _error(app_client.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}), 401)
    assert "alpha" in _models(app_client) and "x" not in _models(app_client)


def test_admin_disabled_without_token(store, tiny_model_dir):
    settings = app_settings(tiny_model_dir, store, server={"admin_token": None})
    with TestClient(create_app(settings)) as client:
        err = _error(client.get("/admin/adapters", headers=ADMIN), 403)
        assert "disabled" in err["message"]


def test_load_list_unload_over_http(app_client, store, tiny_model_dir):
    make_adapter(tiny_model_dir, store / "extra" / "gamma", seed=9)
    r = app_client.post("/admin/adapters", json={"name": "gamma", "path": "extra/gamma"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "loaded"
    assert "gamma" in _models(app_client)
    assert app_client.post("/v1/completions", json={"model": "gamma", "prompt": "x", "max_tokens": 2}).status_code == 200
    names = [a["name"] for a in app_client.get("/admin/adapters", headers=ADMIN).json()["adapters"]]
    assert names == ["alpha", "beta", "gamma"]
    assert app_client.delete("/admin/adapters/gamma", headers=ADMIN).json()["status"] == "unloaded"
    assert "gamma" not in _models(app_client)
    assert _error(app_client.post("/v1/completions", json={"model": "gamma", "prompt": "x"}), 404)["code"] == "model_not_found"
    assert _error(app_client.delete("/admin/adapters/gamma", headers=ADMIN), 404)


def test_replace_keeps_name_and_bumps_version(app_client, store, tiny_model_dir):
    before = app_client.post("/v1/completions", json={"model": "alpha", "prompt": "abc", "max_tokens": 6, "temperature": 0}).json()
    make_adapter(tiny_model_dir, store / "alpha_v2", seed=42)
    r = app_client.post("/admin/adapters", json={"name": "alpha", "path": "alpha_v2"}, headers=ADMIN)
    assert r.json()["status"] == "replaced" and r.json()["replaced_version"] is not None
    after = app_client.post("/v1/completions", json={"model": "alpha", "prompt": "abc", "max_tokens": 6, "temperature": 0}).json()
    assert before["choices"][0]["text"] != after["choices"][0]["text"]
    assert _models(app_client).count("alpha") == 1


def test_vllm_aliases(app_client, store, tiny_model_dir):
    make_adapter(tiny_model_dir, store / "delta", seed=5)
    r = app_client.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": str(store / "delta")}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert "delta" in _models(app_client)
    again = app_client.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": "delta"}, headers=ADMIN)
    assert _error(again, 409)
    inplace = app_client.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": "delta", "load_inplace": True},
                              headers=ADMIN)
    assert inplace.status_code == 200 and inplace.json()["status"] == "replaced"
    r = app_client.post("/v1/unload_lora_adapter", json={"lora_name": "delta"}, headers=ADMIN)
    assert r.status_code == 200 and "delta" not in _models(app_client)


# -- refused adapters -------------------------------------------------------------------------------------
def _copy(store, name="bad"):
    dst = store / name
    shutil.copytree(store / "alpha", dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, fn):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file(fn(tensors), path)


def _pickle_only(folder):
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


def _other_shape_model(folder, tmp_path):
    other = save_model(tmp_path / "wide", n_embd=96, n_head=4)
    shutil.rmtree(folder)
    make_adapter(other, folder, seed=3)


BAD = {
    "missing config": (lambda f, t: (f / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    "config not json": (lambda f, t: (f / "adapter_config.json").write_text("{nope"), "does not parse"),
    "pickle only": (lambda f, t: _pickle_only(f), "pickle"),
    "not safetensors": (lambda f, t: (f / "adapter_model.safetensors").write_bytes(b"\x80\x04garbage"), "safetensors"),
    "rank too large": (lambda f, t: _edit_config(f, r=128, lora_alpha=8), "max_lora_rank"),
    "rank mismatch": (lambda f, t: _edit_config(f, r=3), "do not match rank"),
    "dora": (lambda f, t: _edit_config(f, use_dora=True), "DoRA"),
    "unknown module": (lambda f, t: _edit_tensors(f, lambda d: {k.replace("h.1.", "h.7."): v for k, v in d.items()}),
                       "does not exist"),
    "missing B": (lambda f, t: _edit_tensors(f, lambda d: {k: v for k, v in d.items() if "h.0.attn.c_attn.lora_B" not in k}),
                  "missing its lora_B"),
    "nan weights": (lambda f, t: _edit_tensors(f, lambda d: {k: v * float("nan") for k, v in d.items()}), "NaN"),
    "other base shape": (_other_shape_model, "do not match"),
    "fingerprint": (lambda f, t: (f / "switchboard.json").write_text(json.dumps({"base_fingerprint": "0" * 64})),
                    "different base model"),
    "bad centroid": (lambda f, t: save_file({"centroids": torch.full((1, 8), float("nan"))}, f / "centroid.safetensors"),
                     "centroid"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_refused_and_registry_unchanged(app_client, store, tmp_path, case):
    breaker, message = BAD[case]
    breaker(_copy(store), tmp_path)
    before_models = _models(app_client)
    before_admin = app_client.get("/admin/adapters", headers=ADMIN).json()
    for name in ("bad", "alpha"):  # a new name, and replacing a live adapter with a broken version
        err = _error(app_client.post("/admin/adapters", json={"name": name, "path": "bad"}, headers=ADMIN), 400)
        assert message in err["message"], err["message"]
    assert _models(app_client) == before_models
    assert app_client.get("/admin/adapters", headers=ADMIN).json() == before_admin
    assert app_client.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("body,status,param", [
    ({"name": "x", "path": "../alpha"}, 400, "path"),
    ({"name": "x", "path": "/etc"}, 400, "path"),
    ({"name": "x", "path": "nope"}, 400, "path"),
    ({"name": "bad:name", "path": "alpha"}, 400, "name"),
    ({"name": "auto", "path": "alpha"}, 400, "name"),
    ({"name": "../x", "path": "alpha"}, 400, "name"),
    ({"name": "x"}, 400, "path"),
    ({"name": "x", "path": "alpha", "unexpected": 1}, 400, "unexpected"),
])
def test_bad_admin_requests(app_client, body, status, param):
    before = _models(app_client)
    err = _error(app_client.post("/admin/adapters", json=body, headers=ADMIN), status)
    assert err["param"] == param
    assert _models(app_client) == before


def test_symlink_out_of_store_refused(app_client, store, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(store / "alpha", outside)
    (store / "link").symlink_to(outside)
    err = _error(app_client.post("/admin/adapters", json={"name": "x", "path": "link"}, headers=ADMIN), 400)
    assert "outside the adapter store" in err["message"]


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "auto", "prompt": "x", "routing": {"weights": {"alpha": 0.5, "nope": 0.5}}}, 404, "model"),
    ({"model": "auto", "prompt": "x", "routing": {"weights": {"alpha": -1}}}, 400, "routing.weights"),
    ({"model": "auto", "prompt": "x", "routing": {"weights": {"alpha": 0}}}, 400, "routing.weights"),
    ({"model": "alpha", "prompt": "x", "routing": {"weights": {"alpha": 1}}}, 400, "routing"),
    ({"model": "auto", "prompt": "x", "routing": {"router": "nope"}}, 404, "routing.router"),
    ({"model": "alpha", "prompt": "x", "n": 17}, 400, "n"),
    ({"model": "alpha", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "max_tokens": 200}, 400, "max_tokens"),
    ({"model": "alpha", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "alpha", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "alpha", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "alpha", "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"model": "alpha", "prompt": "x" * 200_000}, 413, "prompt"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "alpha", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"model": "alpha", "prompt": "x", "n": 3, "best_of": 2}, 400, "best_of"),
    ({"model": "alpha", "prompt": "x", "best_of": 3, "stream": True}, 400, "best_of"),
    ({"model": "alpha", "prompt": "x", "best_of": 17}, 400, "best_of"),
    ({"model": "alpha", "prompt": "x", "use_beam_search": True}, 400, "use_beam_search"),
    ({"model": "alpha", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": "alpha", "prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    ({"model": "alpha", "prompt": "x", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ({"model": "alpha", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": "alpha", "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"model": "alpha", "prompt": [[]]}, 400, "prompt"),
])
def test_bad_completion_requests(app_client, body, status, param):
    err = _error(app_client.post("/v1/completions", json=body), status)
    assert err["param"] == param
    assert all(v["in_flight"] == 0 for v in app_client.get("/admin/adapters", headers=ADMIN).json()["adapters"])


def test_malformed_json_is_400(app_client):
    r = app_client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    _error(r, 400)


def test_reload_picks_up_new_folders_and_reports_bad_ones(app_client, store, tiny_model_dir):
    make_adapter(tiny_model_dir, store / "fresh", seed=11)
    _pickle_only(_copy(store, "broken"))
    r = app_client.post("/admin/reload", headers=ADMIN).json()
    assert r["loaded"] == ["fresh"]
    assert "broken" in r["failed"] and "pickle" in r["failed"]["broken"]
    assert set(r["unchanged"]) == {"alpha", "beta"}
    assert "fresh" in _models(app_client) and "broken" not in _models(app_client)
