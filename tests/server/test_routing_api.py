"""`model: "auto"` end to end: centroid routing of real text, mid-stream switches, MLP routers,
and re-routing that costs no extra forward pass."""

from __future__ import annotations

import json
import random

import pytest
import torch
from fastapi.testclient import TestClient

from router_core.artifacts import save_router
from router_core.mlp import MLPRouter, MLPRouterNet
from server.app import create_app
from tests.conftest import ADMIN, require_minilm
from tests.handle import AppHandle
from tests.router_core.test_router_realdata import code_prompts, literature_prompts, math_prompts
from tests.tiny import app_settings, build_tokenizer, make_adapter

N_EXAMPLES, N_HELD_OUT = 40, 100


def _register(client, name: str, examples: list[str], k: int = 1) -> None:
    r = client.post("/admin/adapters", json={"name": name, "path": name, "examples": examples, "centroids": k},
                    headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["adapter"]["centroids"] == [k, 384]


def _top(weights: dict[str, float]) -> str:
    return max(weights, key=weights.__getitem__)


MAX_CHARS = 600  # prompts are cut so they fit the tiny model's context with its 400-token vocabulary


@pytest.fixture()
def domain_store(tmp_path, long_model_dir):
    root = tmp_path / "adapters"
    for seed, name in enumerate(("code", "literature", "math")):
        make_adapter(long_model_dir, root / name, seed=seed + 1)
    return root


@pytest.fixture()
def domains(sample_data):
    return domain_split(sample_data)


def domain_split(sample_data) -> dict[str, tuple[list[str], list[str]]]:
    """Per domain (code, literature, math): `N_EXAMPLES` example prompts and `N_HELD_OUT` held-out
    ones, shuffled with a fixed seed and cut to `MAX_CHARS` (also scripts/measure_form_rules.py's
    in-distribution check)."""
    rng = random.Random(0)
    sets = {"code": code_prompts(sample_data), "literature": literature_prompts(sample_data),
            "math": math_prompts(sample_data / "gsm8k" / "test.jsonl")}
    out = {}
    for name, texts in sets.items():
        rng.shuffle(texts)
        out[name] = ([t[:MAX_CHARS] for t in texts[:N_EXAMPLES]],
                     [t[:MAX_CHARS] for t in texts[N_EXAMPLES:N_EXAMPLES + N_HELD_OUT]])
    return out


def _accuracy(client, domains, names) -> dict[str, float]:
    accuracy = {}
    for name in names:
        held_out = domains[name][1]
        r = client.post("/v1/completions", json={"model": "auto", "prompt": held_out, "max_tokens": 1,
                                                 "routing": {"reroute_every": 0}})
        assert r.status_code == 200, r.text
        tops = [_top(c["routing"][0]["weights"]) for c in r.json()["choices"]]
        accuracy[name] = sum(t == name for t in tops) / len(tops)
    return accuracy


def test_auto_routes_held_out_prompts_to_their_domain(domain_store, long_model_dir, domains):
    """Code vs literature (the product target, >= 99 %), then with GSM8K math as a third domain."""
    require_minilm()
    settings = app_settings(long_model_dir, domain_store, routing={"embedder": "minilm", "route_window": 256})
    with TestClient(create_app(settings)) as client:
        for name in ("code", "literature"):
            _register(client, name, domains[name][0], k=4)
        two = _accuracy(client, domains, ("code", "literature"))
        _register(client, "math", domains["math"][0], k=4)
        three = _accuracy(client, domains, ("code", "literature", "math"))
        print(f"\ncentroid routing accuracy, {N_HELD_OUT} held-out prompts per domain (MiniLM): "
              f"code vs literature {two}; with math {three}")
        assert min(two.values()) >= 0.99
        assert min(three.values()) >= 0.95
        metrics = client.get("/metrics").text
        for name in domains:
            assert f'switchboard_route_decisions_total{{adapter="{name}",router="centroid"}}' in metrics
        assert "switchboard_router_latency_seconds_count" in metrics
        assert 'switchboard_route_weight_bucket{adapter="code"' in metrics


def test_examples_centroid_survives_restart(domain_store, long_model_dir, domains):
    require_minilm()
    settings = app_settings(long_model_dir, domain_store, routing={"embedder": "minilm"})
    with TestClient(create_app(settings)) as client:
        _register(client, "code", domains["code"][0])
    assert (domain_store / "code" / "centroid.safetensors").exists()
    with TestClient(create_app(settings)) as client:
        routers = client.get("/admin/routers", headers=ADMIN).json()["routers"]
        assert routers[0]["adapters"] == ["code"]


def test_stream_switches_adapter_when_context_changes_domain(domain_store, long_model_dir, domains):
    """A code prompt, then generation pushed to prose words (logit_bias): with an 8-token routing
    window the re-router must move the top adapter from `code` to `literature` mid-stream."""
    require_minilm()
    tok = build_tokenizer()
    words = [w for w in (" man", " smiled", " letter", " wife", " truth") if len(tok.encode(w)) == 1]
    assert words, "the tiny tokenizer should have some whole prose words"
    prose = {str(tok.encode(w)[0]): 100 for w in words}
    settings = app_settings(long_model_dir, domain_store, routing={"embedder": "minilm", "route_window": 8})
    with TestClient(create_app(settings)) as client:
        _register(client, "code", domains["code"][0])
        _register(client, "literature", domains["literature"][0])
        body = {"model": "auto", "prompt": "import numpy as np\nx = np.zeros(3)\nfor i in range(10):\n    print(i)\n",
                "max_tokens": 24, "temperature": 0, "stream": True, "logit_bias": prose,
                "routing": {"reroute_every": 2}}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            chunks = [json.loads(e[6:]) for e in "".join(r.iter_text()).split("\n\n") if e and e != "data: [DONE]"]
        tops = [_top(c["choices"][0]["routing"]["weights"]) for c in chunks]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert tops[0] == "code" and tops[-1] == "literature", (tops, text)
        segments = chunks[-1]["choices"][0]["routing"]["segments"]
        assert [_top(s["weights"]) for s in segments][:1] == ["code"] and _top(segments[-1]["weights"]) == "literature"
        assert segments[0]["start_token"] == 0 and segments[-1]["end_token"] == 24
        assert all(a["end_token"] == b["start_token"] for a, b in zip(segments, segments[1:], strict=False))
        switch_at = tops.index("literature")
        assert switch_at % 2 == 0  # decisions fall on the re-routing cadence
        metrics = client.get("/metrics").text
        assert "switchboard_route_switches_total 1.0" in metrics
        assert "switchboard_reroutes_total 11.0" in metrics  # tokens 2, 4, ..., 22
        assert 'switchboard_generated_tokens_total{adapter="literature"}' in metrics


def _count_forwards(client) -> list[int]:
    calls = [0]
    model = AppHandle(client.app).model
    model.transformer.wte.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_rerouting_costs_no_extra_forward(store, tiny_model_dir):
    settings = app_settings(tiny_model_dir, store, routing={"embedder": "base"})
    with TestClient(create_app(settings)) as client:
        for name in ("alpha", "beta"):
            r = client.post("/admin/adapters", json={"name": name, "path": name, "examples": [f"{name} text", "x = 1"]},
                            headers=ADMIN)
            assert r.status_code == 200, r.text
        calls = _count_forwards(client)
        counts = {}
        for every in (0, 2, 1):
            calls[0] = 0
            r = client.post("/v1/completions", json={"model": "auto", "prompt": "def add(a, b):", "max_tokens": 10,
                                                     "temperature": 0, "routing": {"reroute_every": every}})
            assert r.status_code == 200, r.text
            counts[every] = calls[0]
        # one base-model pass over the prompt to route it, the prefill, then one pass per further token
        assert counts == {0: 11, 2: 11, 1: 11}
        assert "switchboard_reroutes_total 13.0" in client.get("/metrics").text  # 4 (every 2) + 9 (every 1)


# -- MLP routers --------------------------------------------------------------------------------------------
def _write_router(store, name, adapters, embed_dim, embedder_id="base:64", seed=0):
    torch.manual_seed(seed)
    net = MLPRouterNet(embed_dim, len(adapters), complexity_dim=0)
    save_router(store / "_routers" / name, MLPRouter(net, adapters, embedder_id))


def test_mlp_router_load_route_unload(app_client, store):
    _write_router(store, "mlp1", ["alpha", "beta"], 64)
    r = app_client.post("/admin/routers", json={"name": "mlp1"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    r = app_client.post("/v1/completions", json={"model": "auto", "prompt": "hello", "max_tokens": 4,
                                                 "routing": {"router": "mlp1"}})
    assert r.status_code == 200, r.text
    weights = r.json()["choices"][0]["routing"][0]["weights"]
    assert set(weights) == {"alpha", "beta"} and abs(sum(weights.values()) - 1) < 1e-3
    # the trace carries each decision's confidence: the top adapter's share
    assert r.json()["choices"][0]["routing"][0]["confidence"] == pytest.approx(max(weights.values()), abs=2e-4)
    by_alias = app_client.post("/v1/completions", json={"model": "auto", "prompt": "hello", "max_tokens": 4,
                                                        "routing": {"router": "mlp"}})
    assert by_alias.status_code == 200
    assert "switchboard_route_decisions_total{adapter=" in app_client.get("/metrics").text
    assert app_client.delete("/admin/routers/mlp1", headers=ADMIN).status_code == 200
    r = app_client.post("/v1/completions", json={"model": "auto", "prompt": "x", "routing": {"router": "mlp1"}})
    assert r.status_code == 404 and r.json()["error"]["param"] == "routing.router"


@pytest.mark.parametrize("adapters,dim,embedder,message", [
    (["alpha", "nope"], 64, "base:64", "nope"),
    (["alpha", "beta"], 32, "base:64", "dim"),
    (["alpha", "beta"], 64, "minilm:all-MiniLM-L6-v2", "embedder"),
])
def test_bad_router_artifacts_refused(app_client, store, adapters, dim, embedder, message):
    _write_router(store, "bad", adapters, dim, embedder)
    r = app_client.post("/admin/routers", json={"name": "bad"}, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    assert [x["name"] for x in app_client.get("/admin/routers", headers=ADMIN).json()["routers"]] == ["centroid", "arrow"]


def test_router_pickle_refused(app_client, store):
    folder = store / "_routers" / "pickled"
    folder.mkdir(parents=True)
    (folder / "router.json").write_text(json.dumps({"kind": "mlp"}))
    (folder / "router.bin").write_bytes(b"\x80\x04pickle")
    r = app_client.post("/admin/routers", json={"name": "pickled"}, headers=ADMIN)
    assert r.status_code == 400


def test_auto_without_centroids_is_a_clear_400(app_client):
    r = app_client.post("/v1/completions", json={"model": "auto", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_routable_adapters"
