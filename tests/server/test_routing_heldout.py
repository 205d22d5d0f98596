"""Routing text unlike the centroid examples, through the server, with default settings.

Centroids come from 40 CodeAlpaca instructions and 40 Project Gutenberg paragraphs; the held-out
texts come from elsewhere (CPython's standard library and headers, code requests and stories
from another instruction set, Tiny Shakespeare): see tests/data/routing/README.md. Product
target: >= 99 % top-1 per domain with defaults. Also: the first decision sees the whole prompt.
"""

from __future__ import annotations

from collections import Counter

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.conftest import ADMIN, require_minilm
from tests.handle import AppHandle
from tests.routing_data import DOMAINS, examples, held_out
from tests.tiny import app_settings, make_adapter

pytestmark = pytest.mark.slow


@pytest.fixture()
def domain_store(tmp_path, long_model_dir):
    root = tmp_path / "adapters"
    for seed, name in enumerate(DOMAINS):
        make_adapter(long_model_dir, root / name, seed=seed + 1)
    return root


def _register_domains(client) -> None:
    for name in DOMAINS:  # default `centroids`: every example kept as a row
        r = client.post("/admin/adapters", json={"name": name, "path": name, "examples": examples(name)}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["adapter"]["centroids"] == [40, 384]


def _top(weights: dict[str, float]) -> str:
    return max(weights, key=weights.__getitem__)


def _first_decisions(client, prompts: list[str], batch: int = 64) -> list[dict[str, float]]:
    out = []
    for i in range(0, len(prompts), batch):
        r = client.post("/v1/completions", json={"model": "auto", "prompt": prompts[i:i + batch], "max_tokens": 1})
        assert r.status_code == 200, r.text
        out += [c["routing"][0]["weights"] for c in r.json()["choices"]]
    return out


def _accuracy(client) -> tuple[dict[str, float], dict[str, str]]:
    accuracy, by_source = {}, {}
    for name in DOMAINS:
        rows = held_out(name)
        tops = [_top(w) for w in _first_decisions(client, [r["text"] for r in rows])]
        accuracy[name] = sum(t == name for t in tops) / len(tops)
        hits, totals = Counter(), Counter()
        for row, top in zip(rows, tops, strict=True):
            source = row["source"].split("/")[0]
            totals[source] += 1
            hits[source] += top == name
        by_source[name] = ", ".join(f"{s} {hits[s]}/{totals[s]}" for s in totals)
    return accuracy, by_source


def test_held_out_sources_route_to_their_domain_with_defaults(domain_store, long_model_dir):
    require_minilm()
    results = {}
    for label, routing in (("defaults", {}), ("last 32 tokens, one mean centroid, T=1", None)):
        settings = app_settings(long_model_dir, domain_store, routing={"embedder": "minilm", **(routing or {})})
        with TestClient(create_app(settings)) as client:
            if routing is None:  # the old behaviour, for comparison: printed, not asserted
                settings.routing.route_prompt_tokens, settings.routing.route_temperature = 0, 1.0
                for name in DOMAINS:
                    r = client.post("/admin/adapters", json={"name": name, "path": name, "examples": examples(name),
                                                             "centroids": 1}, headers=ADMIN)
                    assert r.status_code == 200, r.text
            else:
                _register_domains(client)
                router = client.get("/admin/routers", headers=ADMIN).json()["routers"][0]
                assert router["voting"] and 0 < router["temperature"] < 1 and router["switch_margin"] > 0
            results[label] = _accuracy(client)
    for label, (acc, by_source) in results.items():
        print(f"\nheld-out top-1 ({label}): {acc} | per source: {by_source}")
    accuracy = results["defaults"][0]
    assert min(accuracy.values()) >= 0.99, results["defaults"]


CODE = ("def merge_sorted(a, b):\n    result = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
        "        if a[i] < b[j]:\n            result.append(a[i])\n            i += 1\n        else:\n"
        "            result.append(b[j])\n            j += 1\n    return result + a[i:] + b[j:]\n")
TAIL = ("\nShe read it twice by the window, folded the letter with care, and said nothing to her sister "
        "of the grief that filled her heart that long and quiet evening.")


def test_first_decision_sees_the_whole_prompt(domain_store, long_model_dir):
    """Code, then a sentence of prose longer than the route window: the whole prompt is code
    (the first decision); the window alone is prose (what re-routes see, and what the first
    decision saw before)."""
    require_minilm()
    prompt = CODE + TAIL
    for prompt_tokens, expected in ((None, "code"), (0, "literature")):
        routing = {"embedder": "minilm"} | ({} if prompt_tokens is None else {"route_prompt_tokens": prompt_tokens})
        with TestClient(create_app(app_settings(long_model_dir, domain_store, routing=routing))) as client:
            _register_domains(client)
            tok = AppHandle(client.app).tokenizer
            assert len(tok.encode(TAIL)) > 32
            (weights,) = _first_decisions(client, [prompt])
            assert _top(weights) == expected, (prompt_tokens, weights)
