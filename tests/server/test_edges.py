"""The small endpoints clients probe: models.retrieve, HEAD probes, /version, CORS, the API key
and a 404 that names the inference endpoints."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.conftest import ADMIN
from tests.tiny import app_settings


def test_retrieve_model(app_client, tiny_model_dir):
    r = app_client.get("/v1/models/alpha")
    assert r.status_code == 200 and r.json()["id"] == "alpha" and r.json()["parent"] == tiny_model_dir.name
    assert app_client.get(f"/v1/models/{tiny_model_dir.name}").json()["parent"] is None
    err = app_client.get("/v1/models/nope")
    assert err.status_code == 404 and err.json()["error"]["code"] == "model_not_found"


def test_head_probes_and_version(app_client):
    for path in ("/health", "/ready"):
        r = app_client.head(path)
        assert r.status_code == 200 and r.content == b""
    assert app_client.get("/version").json()["version"]


def test_unknown_path_names_the_inference_endpoints(app_client):
    r = app_client.post("/v1/chat/complete", json={})
    assert r.status_code == 404
    err = r.json()["error"]
    assert "/v1/chat/completions" in err["message"] and "/v1/completions" in err["message"]
    assert err["type"] == "not_found_error"


def test_no_cors_by_default(app_client):
    r = app_client.options("/v1/completions", headers={"Origin": "http://example.com",
                                                       "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


@pytest.fixture()
def guarded(store, tiny_model_dir):
    settings = app_settings(tiny_model_dir, store, server={"admin_token": "T", "api_key": "K",
                                                          "allowed_origins": "http://app.example"})
    with TestClient(create_app(settings)) as client:
        yield client


def test_cors_preflight_for_allowed_origin(guarded):
    ok = guarded.options("/v1/chat/completions", headers={"Origin": "http://app.example",
                                                          "Access-Control-Request-Method": "POST",
                                                          "Access-Control-Request-Headers": "authorization"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
    other = guarded.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                             "Access-Control-Request-Method": "POST"})
    assert other.headers.get("access-control-allow-origin") != "http://evil.example"


def test_api_key_guards_inference_routes_only(guarded):
    body = {"model": "alpha", "prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic K"}):
        r = guarded.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert guarded.get("/v1/models").status_code == 401
    key = {"Authorization": "Bearer K"}
    assert guarded.post("/v1/completions", json=body, headers=key).status_code == 200
    assert guarded.get("/v1/models", headers=key).status_code == 200
    for path in ("/health", "/ready", "/metrics", "/version"):  # probes and scrapers stay open
        assert guarded.get(path).status_code == 200
    assert guarded.get("/admin/adapters", headers=ADMIN).status_code == 200  # admin keeps its own token
    r = guarded.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}, headers=ADMIN)
    assert r.status_code == 404  # the admin alias answered (unknown adapter), not the key check


def test_api_key_from_environment(monkeypatch, store, tiny_model_dir):
    monkeypatch.setenv("SWITCHBOARD_API_KEY", "E")
    from server.settings import ServerSettings

    assert ServerSettings().api_key == "E"


class _Panic(BaseException):
    """Like pyo3's `PanicException` (pydantic-core's Rust panics): a BaseException, not an Exception."""


def test_a_library_panic_fails_its_request_not_the_server(app_client):
    async def panics() -> dict:
        raise _Panic("PyObject pointer is null")

    app_client.app.add_api_route("/panic-test", panics)
    r = app_client.get("/panic-test")
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["type"] == "service_unavailable" and "_Panic" in r.json()["error"]["message"]
    assert app_client.get("/v1/models").status_code == 200  # the server goes on
