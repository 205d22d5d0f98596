"""The fuzz suite (runs in the default test suite, bounded): property-based tests over the
completions and admin APIs against the tiny model, and schemathesis over /openapi.json.

Invariants: no 5xx whatever the input; every error in the OpenAI shape; streams end with
`data: [DONE]`; other streams running meanwhile finish normally; every adapter reference is
released afterwards (`in_flight` 0); a refused admin call leaves the registry as it was.
Examples are derandomised (the same inputs every run, so a failure reproduces) and their number
is bounded so CI stays within its time; raise FUZZ_EXAMPLES locally for a longer hunt."""

from __future__ import annotations

import json
import os
import shutil
import threading

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import ADMIN
from tests.handle import AppHandle
from tests.live import live_server, wait_until
from tests.tiny import app_settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

numbers = st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1e-300, 1e300, -0.0, 2**64]),
                    st.none(), st.booleans(), st.text(max_size=4))
texts = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "x\udfff", "²", "\x00", "a" * 300]))
completion_bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["alpha", "beta", "base", "auto", "nope", "evil\n"]), st.text(max_size=8))},
    optional={
        "prompt": st.one_of(texts, st.lists(texts, max_size=4), st.lists(st.integers(-5, 500), max_size=12),
                            st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=3)),
        "max_tokens": st.one_of(st.integers(-2, 40), st.sampled_from([130, 4097]), numbers),
        "temperature": numbers, "top_p": numbers, "top_k": numbers, "seed": numbers, "n": numbers,
        "logprobs": st.one_of(st.integers(-1, 7), numbers),
        "stop": st.one_of(st.none(), texts, st.lists(texts, max_size=6)),
        "logit_bias": st.dictionaries(st.one_of(st.from_regex(r"[0-9]{1,5}", fullmatch=True), texts), numbers, max_size=4),
        "stream": st.booleans(), "echo": st.booleans(),
        "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
        "routing": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
            "weights": st.dictionaries(st.sampled_from(["alpha", "beta", "zzz", ""]), numbers, max_size=3),
            "router": st.one_of(st.sampled_from(["centroid", "mlp", "x"]), texts),
            "reroute_every": numbers, "top_k": numbers, "temperature": numbers})),
    })


def _error_shaped(r: httpx.Response) -> bool:
    err = r.json().get("error")
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}


def _check_stream(r: httpx.Response) -> None:
    lines = [line for line in r.text.splitlines() if line.startswith("data:")]
    assert lines and lines[-1] == "data: [DONE]", r.text[-300:]
    for line in lines[:-1]:
        body = json.loads(line[6:])
        assert "error" not in body or body["error"]["type"] != "api_error", body


def _registry(base: str) -> dict[str, int]:
    return {a["name"]: a["version"] for a in httpx.get(f"{base}/admin/adapters", headers=ADMIN).json()["adapters"]}


class Background:
    """Streams that run for the whole fuzz run: each must finish normally with the text it
    gives on an idle server."""

    def __init__(self, base: str, n: int = 2) -> None:
        self.base, self.stop, self.results = base, threading.Event(), []
        self.bodies = [{"model": m, "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0, "stream": True}
                       for m in ("alpha", "beta")][:n]
        self.expected = [self._run(b) for b in self.bodies]
        self.threads = [threading.Thread(target=self._loop, args=(b, e)) for b, e in zip(self.bodies, self.expected, strict=True)]

    def _run(self, body: dict) -> tuple[int, str, str]:
        with httpx.stream("POST", f"{self.base}/v1/completions", json=body, timeout=120) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
        return r.status_code, text, lines[-1] if lines else ""

    def _loop(self, body: dict, expected: tuple) -> None:
        while not self.stop.is_set():
            self.results.append((self._run(body), expected))

    def __enter__(self) -> Background:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        assert self.results, "no background stream ran during the fuzz run"
        for got, expected in self.results:
            assert got == expected and got[0] == 200 and got[2] == "data: [DONE]", (got, expected)


def _post_and_check(client: httpx.Client, path: str, body: object, obj: str) -> None:
    """One fuzzed request: never a 5xx; an error in OpenAI's shape, a stream that ends with [DONE],
    or a response object of the route's kind."""
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert _error_shaped(r), r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        _check_stream(r)
    else:
        assert r.json()["object"] == obj


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    from tests.tiny import make_adapter

    store = tmp_path_factory.mktemp("fuzz-store")
    make_adapter(tiny_model_dir, store / "alpha", seed=1, rank=4)
    make_adapter(tiny_model_dir, store / "beta", seed=2, rank=8, alpha=16, targets=("c_attn", "c_fc"))
    settings_ = app_settings(tiny_model_dir, store, engine={"request_timeout": 30})
    with live_server(settings_) as (base, app):
        yield base, app, store


def test_fuzz_completions(server):
    base, app, _ = server
    client = httpx.Client(base_url=base, timeout=60)

    @FUZZ
    @given(body=completion_bodies)
    def one(body):
        _post_and_check(client, "/v1/completions", body, "text_completion")

    with Background(base):
        one()
    wait_until(lambda: AppHandle(app).idle(), what="in_flight back to 0 after the fuzz run")


contents = st.one_of(
    st.none(), texts, st.sampled_from(["x" * 120_000, ""]),
    st.lists(st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["text", "image_url", "input_audio", ""]), texts)},
                                   optional={"text": st.one_of(st.none(), texts, numbers)}), max_size=3))
messages = st.lists(st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer"]), texts)},
    optional={"content": contents, "name": st.one_of(texts, numbers)}), max_size=4)
chat_bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["alpha", "beta", "base", "auto", "nope"]), st.text(max_size=8)),
     "messages": messages,
     # always bounded: chat's default is the rest of the context, which would make the run slow
     "max_tokens": st.one_of(st.integers(-2, 8), st.sampled_from([1e300, 2**64, "x", True, 4097]))},
    optional={
        "temperature": numbers, "top_p": numbers,
        "n": numbers, "seed": numbers, "logprobs": st.one_of(st.booleans(), numbers),
        "top_logprobs": st.one_of(st.integers(-1, 7), numbers), "stop": st.one_of(st.none(), texts, st.lists(texts, max_size=5)),
        "stream": st.booleans(), "repetition_penalty": numbers,
        # LoRAX's fields: served (adapter_id) or a 400 naming them, never ignored
        "adapter_id": st.one_of(st.sampled_from(["alpha", "beta", "nope"]), texts, numbers),
        "adapter_source": st.one_of(st.sampled_from(["local", "hub", "s3"]), texts),
        "merged_adapters": st.one_of(st.none(), st.fixed_dictionaries({"ids": st.lists(texts, max_size=2)})),
        "parameters": st.one_of(st.none(), st.dictionaries(texts, numbers, max_size=2)),
    })


def test_fuzz_chat(server):
    """Chat content (strings, parts of any type, lone surrogates, huge texts, missing text) and
    LoRAX's fields: no 5xx, errors in OpenAI's shape, streams that end with [DONE]."""
    base, app, _ = server
    client = httpx.Client(base_url=base, timeout=60)

    @settings(FUZZ, max_examples=max(8, EXAMPLES // 4))
    @given(body=chat_bodies)
    def one(body):
        _post_and_check(client, "/v1/chat/completions", body, "chat.completion")
        assert client.get("/health").status_code == 200  # the connection is still served

    with Background(base):
        one()
    wait_until(lambda: AppHandle(app).idle(), what="in_flight back to 0 after the chat fuzz run")


factors = st.one_of(st.sampled_from([1.0, 0.0, -1.0, 1e-30, 65504.0, 1e19, 1e30, 1e38, 3e38, -3.4e38]),
                    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))


def test_fuzz_adapter_factors(server, tiny_model_dir):
    """Adapters with rescaled factors (huge but finite, tiny, zero, negative) and LoRA alphas: a
    registration is a 200 or a 400, never a 5xx; a request on a registered one is served or fails
    alone (`row_failed` for that request only), and a mixture that gives it weight 0 -- and the
    background streams -- answer exactly as without it."""
    from safetensors.torch import load_file, save_file

    base, app, store = server
    admin = httpx.Client(base_url=base, timeout=60, headers=ADMIN)
    client = httpx.Client(base_url=base, timeout=60)
    weights = load_file(store / "alpha" / "adapter_model.safetensors")
    config = json.loads((store / "alpha" / "adapter_config.json").read_text())
    mix = {"model": "auto", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    reference = client.post("/v1/completions", json={**mix, "routing": {"weights": {"alpha": 1.0}}}).json()["choices"][0]["text"]

    @settings(FUZZ, max_examples=max(4, EXAMPLES // 10))
    @example(a=1e38, b=1.0, alpha=8)  # the reproduction, always run
    @given(a=factors, b=factors, alpha=st.one_of(st.sampled_from([8, 1e-3, 300, 1e30]), st.integers(1, 64)))
    def one(a, b, alpha):
        folder = store / "fuzzed"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        save_file({k: v * (a if "lora_A" in k else b) for k, v in weights.items()}, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
        r = admin.post("/admin/adapters", json={"name": "fuzzed", "path": "fuzzed"})
        assert r.status_code in (200, 400), (a, b, alpha, r.status_code, r.text[:300])
        if r.status_code == 400:
            assert _error_shaped(r) and r.json()["error"]["code"] == "invalid_adapter", r.text
            return
        own = client.post("/v1/completions", json={**mix, "model": "fuzzed"})
        assert own.status_code == 200 or own.json()["error"]["code"] == "row_failed", (a, b, alpha, own.text[:300])
        zero = client.post("/v1/completions", json={**mix, "routing": {"weights": {"alpha": 1.0, "fuzzed": 0.0}}})
        assert zero.status_code == 200 and zero.json()["choices"][0]["text"] == reference, (a, b, alpha, zero.text[:300])
        assert admin.delete("/admin/adapters/fuzzed").status_code == 200

    with Background(base):
        one()
    wait_until(lambda: AppHandle(app).idle(), what="in_flight back to 0 after the factor fuzz run")


names = st.one_of(st.sampled_from(["gamma", "evil\n", "auto", "Base", "a" * 65, "x:y", "../alpha", ""]), texts)
paths = st.one_of(st.sampled_from(["alpha", "../alpha", "/etc", "/", ".", "alpha/../../x", "a" * 300, "_routers",
                                   "loop", "dangling", "\x00", "alpha/adapter_config.json"]), texts)
admin_calls = st.one_of(
    st.tuples(st.just("POST"), st.just("/admin/adapters"), st.fixed_dictionaries(
        {"name": names, "path": paths},
        optional={"examples": st.one_of(st.none(), st.lists(texts, max_size=3)), "centroids": numbers,
                  "pinned": st.booleans()})),
    st.tuples(st.just("POST"), st.just("/v1/load_lora_adapter"),
              st.fixed_dictionaries({"lora_name": names, "lora_path": paths}, optional={"load_inplace": st.booleans()})),
    st.tuples(st.just("DELETE"), names.map(lambda n: f"/admin/adapters/{n}"), st.none()),
    st.tuples(st.just("POST"), st.just("/v1/unload_lora_adapter"), st.fixed_dictionaries({"lora_name": names})),
    st.tuples(st.just("POST"), st.just("/admin/routers"), st.fixed_dictionaries({"name": names},
                                                                                optional={"path": paths})),
    st.tuples(st.just("DELETE"), names.map(lambda n: f"/admin/routers/{n}"), st.none()),
)


def test_fuzz_admin(server):
    base, app, store = server
    if not (store / "loop").exists():
        os.symlink(store / "loop", store / "loop")
        os.symlink(store / "missing", store / "dangling")
    client = httpx.Client(base_url=base, timeout=60, headers=ADMIN)

    @FUZZ
    @given(call=admin_calls)
    def one(call):
        method, path, body = call
        if any(n in path for n in ("/alpha", "/beta")) or (body and {body.get("name"), body.get("lora_name")} & {"alpha", "beta"}):
            return  # the background streams use them
        before = _registry(base)
        try:
            r = client.request(method, path, content=None if body is None else json.dumps(body),
                               headers={"content-type": "application/json"})
        except (httpx.InvalidURL, UnicodeEncodeError):  # not sendable (a control character, a lone surrogate)
            return
        assert r.status_code < 500, (call, r.status_code, r.text[:500])
        if r.status_code >= 400:
            assert _error_shaped(r), r.text
            assert _registry(base) == before, call  # a refused call changes nothing

    with Background(base):
        one()
    wait_until(lambda: AppHandle(app).idle(), what="in_flight back to 0 after the admin fuzz run")
    assert {"alpha", "beta"} <= set(_registry(base))


def test_schemathesis_openapi(server):
    """Every operation in /openapi.json, with generated valid and invalid inputs: no 5xx, only
    documented status codes, documented content types, error bodies matching their schema."""
    import schemathesis
    from hypothesis import given
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    base, app, _ = server
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    per_operation = max(4, EXAMPLES // 6)
    for operation in operations:
        @settings(max_examples=per_operation, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def one(case):
            if case.path_parameters and set(case.path_parameters.values()) & {"alpha", "beta"}:
                return
            case.call_and_validate(headers=ADMIN, checks=checks)

        one()
    wait_until(lambda: AppHandle(app).idle(), what="in_flight back to 0 after schemathesis")
