"""`POST /v1/chat/completions`: templates (tokenizer's own > --chat-template > the plain-text
default), the same output as completions on the rendered prompt, streaming, logprobs, routing."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.serving.chat_template import DEFAULT_TEMPLATE, load_template
from tests.conftest import ADMIN
from tests.handle import AppHandle
from tests.tiny import app_settings, build_tokenizer, save_model

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"},
            {"role": "assistant", "content": "return a + b"}, {"role": "user", "content": "And sub?"}]
RENDERED = "Be brief.\n\nUser: def add(a, b):\nAssistant: return a + b\nUser: And sub?\nAssistant:"


def _chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES, "max_tokens": 8,
                                                      "temperature": 0, **body})


def test_default_template_renders_a_plain_transcript():
    tok = build_tokenizer()
    assert tok.apply_chat_template(MESSAGES, chat_template=DEFAULT_TEMPLATE, add_generation_prompt=True,
                                   tokenize=False) == RENDERED


def test_chat_equals_completion_of_the_rendered_conversation(app_client):
    r = _chat(app_client)
    assert r.status_code == 200, r.text
    body = r.json()
    ref = app_client.post("/v1/completions", json={"model": "alpha", "prompt": RENDERED, "max_tokens": 8,
                                                    "temperature": 0, "stop": ["\nUser:"]}).json()
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert choice["message"] == {"role": "assistant", "content": ref["choices"][0]["text"]}
    assert choice["finish_reason"] == ref["choices"][0]["finish_reason"]
    assert choice["routing"] == ref["choices"][0]["routing"]
    assert body["usage"] == ref["usage"]


def test_chat_stream_matches_non_stream(app_client):
    full = _chat(app_client, logprobs=True, top_logprobs=2).json()["choices"][0]
    r = _chat(app_client, stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(d["delta"].get("content", "") for d in deltas) == full["message"]["content"]
    content = [t for d in deltas if d["logprobs"] for t in d["logprobs"]["content"]]
    assert content == full["logprobs"]["content"]
    assert deltas[-1]["finish_reason"] == full["finish_reason"]
    assert deltas[-1]["routing"]["segments"] == full["routing"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(content)


def test_chat_logprobs_shape(app_client):
    choice = _chat(app_client, logprobs=True, top_logprobs=3).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 8
    for entry in content:
        if "\ufffd" not in entry["token"]:  # a whole character: its bytes are its text's
            assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy: the most likely
    assert _chat(app_client).json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("body,param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"n": 2, "best_of": 3}, "best_of"),
])
def test_bad_chat_requests(app_client, body, param):
    r = _chat(app_client, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_text_content_parts_and_unknown_fields(app_client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "def add(a, b):"}]}]
    r = _chat(app_client, messages=parts, store=False, metadata={"k": "v"})  # unknown to this server: accepted
    assert r.status_code == 200, r.text
    same = _chat(app_client, messages=[{"role": "user", "content": "def add(a, b):"}]).json()
    assert r.json()["choices"][0]["message"] == same["choices"][0]["message"]


def test_auto_routes_on_the_conversation(app_client):
    for name, examples in (("alpha", ["def add(a, b): return a + b", "import os"]),
                           ("beta", ["It was a dark and stormy night", "Mr. Holmes said"])):
        r = app_client.post("/admin/adapters", json={"name": name, "path": name, "examples": examples}, headers=ADMIN)
        assert r.status_code == 200, r.text
    r = _chat(app_client, model="auto", routing={"reroute_every": 2})
    assert r.status_code == 200, r.text
    segments = r.json()["choices"][0]["routing"]
    assert segments and set(segments[0]["weights"]) <= {"alpha", "beta"}
    assert abs(sum(segments[0]["weights"].values()) - 1) < 1e-3


def _client(model_dir, store, **server):
    return TestClient(create_app(app_settings(model_dir, store, server={"admin_token": "T", **server})))


def test_template_precedence(tmp_path, store, tiny_model_dir):
    setting = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    with _client(tiny_model_dir, store, chat_template=setting) as client:  # no template of its own: the setting
        tok = AppHandle(client.app).tokenizer
        r = _chat(client, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("<user>hi<assistant>"))
    own = save_model(tmp_path / "with-template")
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tok.save_pretrained(own)
    with _client(own, store, chat_template=setting) as client:  # the tokenizer's own wins
        r = _chat(client, model=own.name, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("[hi]"))


def test_chat_template_setting_file_string_and_refusal(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert load_template(str(path)) == "{{ messages[0]['content'] }}"
    assert load_template("{{ 'x' }}") == "{{ 'x' }}"
    with pytest.raises(ValueError, match="neither a readable file"):
        load_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="not valid Jinja"):
        load_template("{% for %}")


def test_token_bytes_are_exact_for_partial_characters():
    from server.serving.logprobs import token_bytes

    tok = build_tokenizer()
    to_bytes = token_bytes(tok)
    text = "naïve café ✓ déjà vu"
    ids = tok.encode(text)
    assert b"".join(to_bytes(i) for i in ids) == text.encode("utf-8")  # though single tokens decode to "\ufffd"
    assert any(tok.decode([i]) == "\ufffd" for i in ids)
    assert to_bytes(tok.eos_token_id) == tok.eos_token.encode()


def test_chat_stream_disconnect_frees_the_row(tiny_model_dir, store):

    import httpx

    from tests.live import assert_abandoned_stream_cancelled, live_server

    with live_server(app_settings(tiny_model_dir, store)) as (base, app):
        body = {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if '"content"' in line)
        assert_abandoned_stream_cancelled(base, app, 100, ADMIN)
