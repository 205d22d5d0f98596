"""HTTP API: completions (fixed adapter, manual mixture, base), SSE framing, models, metrics."""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer

from tests.conftest import ADMIN
from tests.tiny import peft_reference

PROMPT = "def add(a, b):"


def _peft_greedy(tiny_model_dir, store, weights: dict[str, float], n: int) -> str:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = peft_reference(tiny_model_dir, store, weights)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id,
                             eos_token_id=None)[0, ids.shape[1]:]
    return tok.decode(out, skip_special_tokens=True)


def _complete(client, **body):
    return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **body})


def test_fixed_adapter_greedy_equals_peft(app_client, tiny_model_dir, store):
    r = _complete(app_client, model="alpha")
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == _peft_greedy(tiny_model_dir, store, {"alpha": 1.0}, 8)
    assert choice["finish_reason"] == "length"
    assert choice["routing"] == [{"start_token": 0, "end_token": 8, "weights": {"alpha": 1.0},
                                   "confidence": 1.0}]
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8
    assert body["object"] == "text_completion" and body["model"] == "alpha"


def test_manual_mixture_equals_cat_merge(app_client, tiny_model_dir, store):
    r = _complete(app_client, model="auto", routing={"weights": {"alpha": 0.5, "beta": 0.5}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == _peft_greedy(tiny_model_dir, store, {"alpha": 0.5, "beta": 0.5}, 8)
    assert choice["routing"][0]["weights"] == {"alpha": 0.5, "beta": 0.5}
    assert choice["text"] != _complete(app_client, model="alpha").json()["choices"][0]["text"]


def test_base_model_by_id(app_client, tiny_model_dir):
    base_id = tiny_model_dir.name
    r = _complete(app_client, model=base_id)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["routing"] == [{"start_token": 0, "end_token": 8, "weights": {},
                                                         "confidence": None}]


def test_list_prompt_and_logprobs(app_client):
    r = _complete(app_client, model="alpha", prompt=[PROMPT, "Mr. Holmes"], logprobs=1)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["text"] == _complete(app_client, model="alpha").json()["choices"][0]["text"]
    lp = choices[0]["logprobs"]["token_logprobs"]
    assert len(lp) == 8 and all(x <= 0 for x in lp)


def test_stop_string_truncates(app_client):
    full = _complete(app_client, model="beta", max_tokens=12).json()["choices"][0]["text"]
    stop = full[3:5]
    assert stop and stop in full
    r = _complete(app_client, model="beta", max_tokens=12, stop=[stop])
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[: full.index(stop)]


def test_sse_stream_framing(app_client):
    full = _complete(app_client, model="alpha").json()["choices"][0]["text"]
    with app_client.stream("POST", "/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 8,
                                                            "temperature": 0, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert len(chunks) == 8
    assert all(c["choices"][0]["routing"]["weights"] == {"alpha": 1.0} for c in chunks)
    assert [c["choices"][0]["routing"]["token_index"] for c in chunks] == list(range(8))
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["routing"]["segments"][0]["end_token"] == 8


def test_models_lists_base_and_adapters(app_client, tiny_model_dir):
    data = app_client.get("/v1/models").json()["data"]
    ids = {m["id"]: m for m in data}
    assert {"alpha", "beta", tiny_model_dir.name} <= set(ids)
    assert ids["alpha"]["parent"] == tiny_model_dir.name
    assert ids[tiny_model_dir.name]["parent"] is None


def test_health_ready_and_metrics(app_client):
    assert app_client.get("/health").json() == {"status": "ok"}
    assert app_client.get("/ready").status_code == 200
    _complete(app_client, model="alpha")
    _complete(app_client, model="nope")
    _complete(app_client, model="alpha", temperature=-1)
    text = app_client.get("/metrics").text
    assert 'switchboard_requests_total{model="invalid",status="400"} 1.0' in text
    assert "_created" not in text
    assert 'switchboard_requests_total{model="alpha",status="200"} 1.0' in text
    assert 'switchboard_requests_total{model="unknown",status="404"} 1.0' in text
    assert 'switchboard_generated_tokens_total{adapter="alpha"} 8.0' in text
    assert "switchboard_time_to_first_token_seconds_count 1.0" in text
    assert "switchboard_inter_token_latency_seconds_count 7.0" in text
    assert "switchboard_adapters_loaded 2.0" in text
    assert 'switchboard_adapter_events_total{event="load"} 2.0' in text
    for name in ("switchboard_batch_size_bucket", "switchboard_queue_depth", "switchboard_request_latency_seconds_count",
                 "switchboard_adapter_load_seconds_count"):
        assert name in text


def test_admin_listing_shows_residency(app_client):
    _complete(app_client, model="beta")
    adapters = {a["name"]: a for a in app_client.get("/admin/adapters", headers=ADMIN).json()["adapters"]}
    assert adapters["beta"]["resident"] is True and adapters["beta"]["rank"] == 8
    assert adapters["alpha"]["target_modules"] == ["c_attn", "c_proj"]
