"""`routing.router: "arrow"` through the API: adapters with no examples and no centroids are
routable, the per-request `top_k` / `temperature` reach the layers, the trace reports the mean
weight per adapter over layers, and `GET /admin/routers` lists the router."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.app import create_app
from tests.conftest import ADMIN
from tests.tiny import app_settings


def _complete(client, **body):
    return client.post("/v1/completions", json={"prompt": "the quick brown fox", "max_tokens": 6,
                                                 "temperature": 0, **body})


def test_arrow_routes_adapters_without_examples(app_client):
    r = _complete(app_client, model="auto", routing={"router": "arrow", "top_k": 1, "temperature": 0.5})
    assert r.status_code == 200, r.text
    segments = r.json()["choices"][0]["routing"]
    assert segments and segments[-1]["end_token"] == 6
    for seg in segments:
        assert set(seg["weights"]) <= {"alpha", "beta"}
        assert abs(sum(seg["weights"].values()) - 1) < 1e-3
    # the request's top_k and temperature reach the layers: other settings give other weights
    other = _complete(app_client, model="auto", routing={"router": "arrow", "top_k": 2, "temperature": 5.0})
    assert other.json()["choices"][0]["routing"] != segments
    routers = app_client.get("/admin/routers", headers=ADMIN).json()["routers"]
    arrow = next(x for x in routers if x["name"] == "arrow")
    assert arrow["kind"] == "arrow" and arrow["adapters"] == ["alpha", "beta"]


def test_arrow_as_the_server_default(store, tiny_model_dir):
    settings = app_settings(tiny_model_dir, store, routing={"router": "arrow"})
    with TestClient(create_app(settings)) as client:
        r = _complete(client, model="auto", stream=False)
        assert r.status_code == 200, r.text
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["alpha"].get("routable") and models["beta"].get("routable")
