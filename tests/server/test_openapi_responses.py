"""/openapi.json describes what clients get: every JSON route names a response model, and real
answers of each route (adapters and routers loaded, routed and fixed completions, the vLLM
aliases) validate against the schema it publishes. Fields an entry does not carry stay absent
(the response models do not add nulls)."""

from __future__ import annotations

import jsonschema
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.conftest import ADMIN
from tests.tiny import app_settings

JSON_ROUTES = {("get", "/health"), ("get", "/ready"), ("get", "/v1/models"), ("get", "/v1/models/{model_id}"),
               ("post", "/v1/completions"), ("post", "/v1/chat/completions"),
               ("get", "/admin/adapters"), ("post", "/admin/adapters"), ("delete", "/admin/adapters/{name}"),
               ("post", "/admin/reload"), ("get", "/admin/routers"), ("post", "/admin/routers"),
               ("delete", "/admin/routers/{name}"), ("post", "/v1/load_lora_adapter"),
               ("post", "/v1/unload_lora_adapter")}


@pytest.fixture()
def client(store, tiny_model_dir):
    from router_core.artifacts import save_router
    from router_core.mlp import MLPRouter, MLPRouterNet

    save_router(store / "_routers" / "r1", MLPRouter(MLPRouterNet(64, 2, 0), ["alpha", "beta"], "base:64"))
    with TestClient(create_app(app_settings(tiny_model_dir, store))) as c:
        yield c


def _check(schema: dict, method: str, path: str, body: dict) -> None:
    """Validate `body` against the 200 JSON schema `path` publishes (refs resolved in the document)."""
    content = schema["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    assert "$ref" in content, (method, path, content)  # a named model, not a bare object
    jsonschema.validate(body, {**content, "components": schema["components"]},
                        cls=jsonschema.Draft202012Validator)
    name = content["$ref"].rsplit("/", 1)[-1]
    model = schema["components"]["schemas"][name]
    assert set(model["required"]) <= set(body), (name, body)


def test_every_json_route_has_a_response_model(client):
    schema = client.get("/openapi.json").json()
    for method, path in JSON_ROUTES:
        content = schema["paths"][path][method]["responses"]["200"]["content"]
        assert "$ref" in content["application/json"]["schema"], (method, path)
    for path in ("/v1/completions", "/v1/chat/completions"):
        streaming = schema["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(streaming) == {"application/json", "text/event-stream"}
    assert schema["paths"]["/ready"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]["$ref"] \
        .endswith("/Loading")


def test_real_answers_match_the_published_schema(client):
    schema = client.get("/openapi.json").json()

    def call(method: str, path: str, route: str | None = None, **kw) -> dict:
        r = client.request(method, path, headers=ADMIN, **kw)
        assert r.status_code == 200, (path, r.text)
        _check(schema, method.lower(), route or path, r.json())
        return r.json()

    call("GET", "/health")
    call("GET", "/ready")
    loaded = call("POST", "/admin/adapters", json={"name": "gamma", "path": "alpha",
                                                   "examples": ["def f(x):\n    return x", "print(1)"],
                                                   "centroids": 2, "pinned": True})
    assert loaded["status"] == "loaded" and loaded["adapter"]["centroids"] == [2, 64]
    assert call("POST", "/admin/adapters", json={"name": "gamma", "path": "beta"})["replaced_version"] is not None
    call("POST", "/admin/adapters", json={"name": "delta", "path": "beta", "examples": ["Once upon a time."]})
    call("GET", "/admin/adapters")
    routers = call("GET", "/admin/routers")
    assert [r["name"] for r in routers["routers"]] == ["centroid", "arrow", "r1"]
    assert "embedder" not in routers["routers"][0] and routers["routers"][2]["embedder"] == "base:64"
    models = call("GET", "/v1/models")
    by_id = {m["id"]: m for m in models["data"]}
    base = next(m for m in models["data"] if m["parent"] is None)
    assert set(base) == {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "dtype",
                         "quantization"}  # no nulls added
    assert by_id["auto"]["routers"] == ["centroid", "arrow", "r1"] and "version" not in by_id["auto"]
    assert by_id["delta"]["routable"] and by_id["alpha"]["routable"] and not by_id["gamma"]["routable"]  # r1 has alpha

    for body in ({"model": "alpha", "prompt": "Hello", "max_tokens": 3},
                 {"model": "auto", "prompt": ["def g():", "It was"], "max_tokens": 4, "logprobs": 1,
                  "routing": {"reroute_every": 2}},
                 {"model": "auto", "prompt": "x", "max_tokens": 2, "routing": {"router": "r1"}},
                 {"model": "base", "prompt": [5, 6, 7], "max_tokens": 2, "stop": ["zz"]}):
        out = call("POST", "/v1/completions", json=body)
        assert out["object"] == "text_completion" and len(out["choices"]) == (2 if isinstance(body["prompt"], list)
                                                                              and isinstance(body["prompt"][0], str) else 1)
    call("GET", "/v1/models/gamma", "/v1/models/{model_id}")
    chat = call("POST", "/v1/chat/completions", json={"model": "auto", "max_tokens": 3, "logprobs": True, "top_logprobs": 2,
                                                      "messages": [{"role": "user", "content": "def g():"}]})
    assert chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    routed = client.post("/v1/completions", json={"model": "auto", "prompt": "def g():", "max_tokens": 4}).json()
    segment = routed["choices"][0]["routing"][0]
    assert segment["start_token"] == 0 and set(segment["weights"]) <= {"gamma", "delta"}

    call("POST", "/admin/routers", json={"name": "r2", "path": "_routers/r1"})
    call("DELETE", "/admin/routers/r2", "/admin/routers/{name}")
    call("POST", "/admin/reload")
    call("POST", "/v1/load_lora_adapter", json={"lora_name": "epsilon", "lora_path": "alpha"})
    call("POST", "/v1/unload_lora_adapter", json={"lora_name": "epsilon"})
    call("DELETE", "/admin/adapters/delta", "/admin/adapters/{name}")
