"""The centroid router reads form beside topic in the server (router_core/form.py, docs/routing.md).

With MiniLM and spaCy, each adapter's form group comes from its examples (`examples.jsonl` at
load, or `examples` at registration), `GET /admin/routers` reports the groups, and a first
decision on prose whose topic is software goes to the prose adapter. Without spaCy the router
routes on topic alone and says why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from router_core.artifacts import ArtifactError
from server.app import create_app
from tests.conftest import ADMIN, require_minilm, require_spacy
from tests.routing_data import examples
from tests.tiny import app_settings, make_adapter

pytestmark = pytest.mark.slow

# hand-written quips about computers (no held-out source): topic says code, form says prose
QUIPS = ["A keyboard remembers every word you almost wrote.",
         "My laptop and I have an understanding: it pretends to work, and I pretend to believe it."]
REQUEST = "Write a Python function `add(a, b)`. Return the sum of a and b."


@pytest.fixture()
def form_store(tmp_path, tiny_model_dir) -> Path:
    root = tmp_path / "adapters"
    for seed, name in enumerate(("code", "literature")):
        make_adapter(tiny_model_dir, root / name, seed=seed + 1)
    with (root / "code" / "examples.jsonl").open("w") as fh:  # what switchboard-train writes
        for text in examples("code"):
            fh.write(json.dumps({"prompt": text, "query": text}) + "\n")
    return root


def _tops(client: TestClient) -> list[str]:
    r = client.post("/v1/completions", json={"model": "auto", "prompt": [*QUIPS, REQUEST], "max_tokens": 1})
    assert r.status_code == 200, r.text
    return [max(w := c["routing"][0]["weights"], key=w.__getitem__) for c in r.json()["choices"]]


def _centroid_router(client: TestClient) -> dict:
    routers = client.get("/admin/routers", headers=ADMIN).json()["routers"]
    return next(r for r in routers if r["name"] == "centroid")


def _serve(tiny_model_dir: Path, store: Path) -> TestClient:
    return TestClient(create_app(app_settings(tiny_model_dir, store, routing={"embedder": "minilm", "route_form": "auto"})))


def test_form_groups_from_examples_and_prose_about_software_goes_to_prose(form_store, tiny_model_dir) -> None:
    require_minilm()
    require_spacy()
    with _serve(tiny_model_dir, form_store) as client:
        form = _centroid_router(client)["form"]  # one adapter routable (code, from examples.jsonl)
        assert form["on"] is True and form["groups"] == {"code": "request"}, form
        r = client.post("/admin/adapters", json={"name": "literature", "path": "literature",
                                                 "examples": examples("literature")}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert _centroid_router(client)["form"] == {"on": True, "note": "on",
                                                    "groups": {"code": "request", "literature": "prose"}}
        assert _tops(client) == ["literature", "literature", "code"]
    # a restart: `literature` has no examples.jsonl; its group was saved with its centroid
    with _serve(tiny_model_dir, form_store) as client:
        assert _centroid_router(client)["form"]["groups"] == {"code": "request", "literature": "prose"}
        assert _tops(client) == ["literature", "literature", "code"]


def test_without_spacy_the_router_routes_on_topic_and_says_so(form_store, tiny_model_dir, monkeypatch) -> None:
    require_minilm()
    import server.routing.catalogue as catalogue

    def missing(name: str):
        raise ArtifactError("spaCy is not installed (pip install 'lora-switchboard[routing]')")

    monkeypatch.setattr(catalogue, "_spacy", missing)
    with _serve(tiny_model_dir, form_store) as client:
        r = client.post("/admin/adapters", json={"name": "literature", "path": "literature",
                                                 "examples": examples("literature")}, headers=ADMIN)
        assert r.status_code == 200, r.text
        form = _centroid_router(client)["form"]
        assert form["on"] is False and "spaCy is not installed" in form["note"], form
        assert _tops(client) == ["code", "code", "code"]  # topic alone: the quips' topic is code
