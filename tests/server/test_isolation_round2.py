"""The second fuzz and fault pass (issue 23): each reproduction is a clear 4xx naming its field,
the registry keeps no reference, and the server logs the refusal with its code and message."""

from __future__ import annotations

import logging
import shutil
import time

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from server.app import create_app
from tests.conftest import ADMIN
from tests.server.test_isolation_api import _error, _in_flight, post_raw
from tests.tiny import app_settings

HI = {"model": "base", "prompt": "hi", "max_tokens": 4}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    """One app for the module's read-only checks (an app per test cost most of this file's time)."""
    from tests.tiny import make_adapter

    root = tmp_path_factory.mktemp("round2") / "adapters"
    root.mkdir()
    make_adapter(tiny_model_dir, root / "alpha", seed=1, rank=4, targets=("c_attn", "c_proj"))
    make_adapter(tiny_model_dir, root / "beta", seed=2, rank=8, alpha=16, targets=("c_attn", "c_fc"))
    with TestClient(create_app(app_settings(tiny_model_dir, root))) as client:
        yield client, root


@pytest.fixture()
def app_client(shared):
    return shared[0]


@pytest.fixture()
def store(shared):
    return shared[1]
CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

REPRODUCTIONS_2 = [  # (path, body, status, param)
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "x\udfff"}]}]},
     400, "messages.0.content.0.text"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400, "messages.0.content.0.text"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 60_000}] * 8}, 413, "messages"),
    ("/v1/completions", {**HI, "prompt": ["x" * 99_000] * 5}, 413, "prompt"),
    ("/v1/completions", {**HI, "prompt": [1] * 5_000}, 400, "max_tokens"),
    ("/v1/completions", {**HI, "prompt": [True, False]}, 400, "prompt"),
    ("/v1/completions", {**HI, "model": "alpha", "temperature": 1, "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    ("/v1/completions", {**HI, "merged_adapters": {"ids": ["alpha", "beta"], "weights": [0.5, 0.5]}}, 400, "merged_adapters"),
    ("/v1/completions", {**HI, "parameters": {"adapter_id": "alpha"}}, 400, "parameters"),
    ("/v1/completions", {**HI, "adapter_id": "alpha", "adapter_source": "hub"}, 400, "adapter_source"),
    ("/v1/completions", {**HI, "model": "beta", "adapter_id": "alpha"}, 400, "adapter_id"),
    ("/v1/chat/completions", {**CHAT, "model": "base", "merged_adapters": {"ids": ["alpha"]}}, 400, "merged_adapters"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), REPRODUCTIONS_2,
                         ids=[f"{p}-{i}" for i, (_, _, _, p) in enumerate(REPRODUCTIONS_2)])
def test_round2_reproductions_are_4xx(app_client, path, body, status, param, caplog):
    with caplog.at_level(logging.INFO, logger="server.api.http_errors"):
        err = _error(post_raw(app_client, path, body), status)
    assert err["param"] == param, err
    assert set(_in_flight(app_client).values()) == {0}
    # the refusal is in the server's log with its code and message (never the body)
    line = next(r.getMessage() for r in caplog.records if f"-> {status}" in r.getMessage())
    assert path in line and err["message"][:60] in line and (err["code"] or "-") in line


def test_connection_survives_a_refused_chat(app_client):
    """The 500 from the tokenizer used to make uvicorn close the kept-alive connection; now the
    refusal is a 400 and the next request on the same client is served."""
    _error(post_raw(app_client, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}), 400)
    assert app_client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_lorax_adapter_id_serves_that_adapter(app_client):
    """`adapter_id` with the base model means that adapter (LoRAX's meaning), on both routes; it
    answers what `model: <adapter>` answers, not what the base answers."""
    body = {"prompt": "The quick", "max_tokens": 6, "temperature": 0}
    as_model = app_client.post("/v1/completions", json={**body, "model": "alpha"}).json()["choices"][0]["text"]
    base = app_client.post("/v1/completions", json={**body, "model": "base"}).json()["choices"][0]["text"]
    via_id = app_client.post("/v1/completions", json={**body, "model": "base", "adapter_id": "alpha",
                                                      "adapter_source": "local"}).json()
    assert via_id["choices"][0]["text"] == as_model != base
    chat = {**CHAT, "temperature": 0}
    want = app_client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    got = app_client.post("/v1/chat/completions", json={**chat, "model": "base", "adapter_id": "alpha"}).json()
    assert got["choices"][0]["message"]["content"] == want
    assert _error(app_client.post("/v1/completions", json={**body, "model": "base", "adapter_id": "nope"}), 404)["code"] \
        == "model_not_found"


def test_one_not_found_code(app_client):
    codes = {_error(app_client.get("/v1/models/nope"), 404)["code"],
             _error(app_client.post("/v1/completions", json={**HI, "model": "nope"}), 404)["code"],
             _error(app_client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}), 404)["code"],
             _error(app_client.delete("/admin/adapters/nope", headers=ADMIN), 404)["code"]}
    assert codes == {"model_not_found"}


def test_model_id_with_a_trailing_newline_is_not_found(app_client):
    assert _error(app_client.get("/v1/models/alpha%0A"), 404)["param"] == "model"
    assert app_client.get("/v1/models/alpha").json()["id"] == "alpha"


def test_models_carry_max_model_len(app_client):
    data = app_client.get("/v1/models").json()["data"]
    assert {m["max_model_len"] for m in data} == {128}  # the tiny model's n_positions


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/version", "/", "/health", "/ready", "/v1/models/alpha"])
def test_head_on_get_routes(app_client, path):
    get, head = app_client.get(path), app_client.head(path)
    assert head.status_code == get.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_router_path_message_says_router(app_client):
    err = _error(app_client.post("/admin/routers", json={"name": "r9", "path": "_routers/none"}, headers=ADMIN), 400)
    assert err["message"].startswith("router path") and "adapter path" not in err["message"]


def test_huge_finite_adapter_is_refused_at_registration(app_client, store):
    """Item 1's reproduction through the API: lora_A rescaled to 1e38 (finite in fp32) is a 400
    that names the bound; the registry is unchanged."""
    shutil.rmtree(store / "loud", ignore_errors=True)
    shutil.copytree(store / "alpha", store / "loud")
    tensors = load_file(store / "loud" / "adapter_model.safetensors")
    save_file({k: (torch.full_like(v, 1e38) if "lora_A" in k else v) for k, v in tensors.items()},
              store / "loud" / "adapter_model.safetensors")
    before = _in_flight(app_client)
    err = _error(app_client.post("/admin/adapters", json={"name": "loud", "path": "loud"}, headers=ADMIN), 400)
    assert "overflow" in err["message"] and err["code"] == "invalid_adapter"
    assert _in_flight(app_client) == before


def test_request_timeout_counts_from_arrival(store, tiny_model_dir, monkeypatch, tmp_path):
    """Validation that outlasts `request_timeout` ends the request with a 504 at the deadline,
    not a 200 long after it (the timeout used to start only once validation was done)."""
    from server.serving import completion_service

    real = completion_service.build_choices

    def slow(*args, **kwargs):
        time.sleep(2.0)  # a heavy body being tokenised
        return real(*args, **kwargs)

    monkeypatch.setattr(completion_service, "build_choices", slow)
    own = tmp_path / "adapters"
    shutil.copytree(store, own, ignore=shutil.ignore_patterns("_manifest*", ".manifest.lock"))
    settings = app_settings(tiny_model_dir, own, engine={"request_timeout": 0.5})
    with TestClient(create_app(settings)) as client:
        start = time.monotonic()
        err = _error(client.post("/v1/completions", json={**HI, "model": "alpha"}), 504)
        assert err["code"] == "timeout" and time.monotonic() - start < 1.9
        time.sleep(2.0)  # the abandoned validation finishes; the references it took are released
        assert set(_in_flight(client).values()) == {0}


def test_warning_for_ignored_fields_is_documented():
    """Every field the server refuses or serves specially is listed in docs/clients.md."""
    from server.serving import lorax_fields, request_fields
    from tests.paths import REPO

    doc = (REPO / "docs" / "clients.md").read_text()
    for name in [*request_fields.UNSUPPORTED, *lorax_fields.FIELDS]:
        assert f"`{name}`" in doc, name


def test_redoc_loads_nothing_from_a_cdn(app_client):
    js = app_client.get("/static-docs/redoc.standalone.js")
    assert js.status_code == 200 and b"cdn.redoc.ly" not in js.content and b"/static/favicon.svg" in js.content
    assert "https://" not in app_client.get("/redoc").text.replace("https://fastapi.tiangolo.com", "")


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("mmap: Cannot allocate memory")])
def test_running_out_of_memory_on_any_route_is_a_retryable_503(app_client, monkeypatch, error):
    """The OS refusing memory (a memory limit: tests/product/test_memory_limit.py once got a 500
    listing 600 models) is a 503 the client may retry, in the OpenAI shape; the server goes on."""
    registry = app_client.app.state.switchboard.services.registry

    def refused():
        raise error

    from fastapi.testclient import TestClient

    served = TestClient(app_client.app, raise_server_exceptions=False)  # as uvicorn: the response, then a log line
    monkeypatch.setattr(registry, "snapshot", refused)
    try:
        r = served.get("/v1/models")
    finally:
        monkeypatch.undo()
    assert r.status_code == 503 and "out of memory" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["type"] == "service_unavailable" and r.headers.get("retry-after")
    assert served.get("/v1/models").status_code == 200
