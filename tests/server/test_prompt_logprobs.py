"""vLLM's `prompt_logprobs` on /v1/completions (per choice) and /v1/chat/completions (top level):
per prompt position the prompt's own token and the N most likely, each with its log-prob, rank and
text, equal to HF's `log_softmax` of the same adapter or mixture (PEFT, cat merge) to 1e-4."""

from __future__ import annotations

import pytest
import torch

from tests.handle import AppHandle
from tests.tiny import peft_reference

PROMPTS = [[5, 17, 42, 8, 99, 3, 250, 11, 64], [7, 1, 300, 2, 9]]
N = 3


def _check_against(ref: torch.Tensor, ids: list[int], got: list, tok) -> None:
    """`got` (one prompt's `prompt_logprobs`) against `ref` [T, V], the reference log-probs."""
    assert len(got) == len(ids) and got[0] is None
    for t in range(1, len(ids)):
        dist, entry = ref[t - 1], got[t]
        own = entry[str(ids[t])]
        value = dist[ids[t]].item()
        assert abs(own["logprob"] - value) <= 1e-4
        assert (dist > value + 1e-4).sum().item() + 1 <= own["rank"] <= (dist >= value - 1e-4).sum().item()
        top = torch.topk(dist, N)
        assert list(entry)[0] == str(ids[t])  # the prompt's token first, as vLLM builds the dict
        assert set(entry) == {str(ids[t])} | {str(i) for i in top.indices.tolist()}
        for rank, (i, v) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True), start=1):
            assert abs(entry[str(i)]["logprob"] - v) <= 1e-4 and entry[str(i)]["rank"] == rank
        assert all(e["decoded_token"] == tok.decode([int(k)]) for k, e in entry.items())


@pytest.mark.parametrize("model,weights", [("alpha", {"alpha": 1.0}), ("auto", {"alpha": 0.3, "beta": 0.7}),
                                           ("base", None)])
def test_completions_prompt_logprobs_equal_hf_log_softmax(app_client, store, tiny_model_dir, model, weights):
    body: dict = {"model": tiny_model_dir.name if model == "base" else model, "prompt": PROMPTS, "max_tokens": 3,
                  "temperature": 0}
    if model == "auto":
        body["routing"] = {"weights": weights}
    plain = app_client.post("/v1/completions", json=body)
    r = app_client.post("/v1/completions", json={**body, "prompt_logprobs": N})
    assert r.status_code == 200, r.text
    assert "prompt_logprobs" not in plain.json()["choices"][0]  # only when asked
    ref_model = peft_reference(tiny_model_dir, store, weights)
    tok = AppHandle(app_client.app).tokenizer
    for ids, choice, free in zip(PROMPTS, r.json()["choices"], plain.json()["choices"], strict=True):
        assert choice["text"] == free["text"] and choice["logprobs"] is None  # the completion is unchanged
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [T, V]
        _check_against(ref, ids, choice["prompt_logprobs"], tok)


def test_chat_puts_prompt_logprobs_at_the_top_level(app_client, store, tiny_model_dir):
    messages = [{"role": "user", "content": "def add(a, b):"}]
    r = app_client.post("/v1/chat/completions", json={"model": "beta", "messages": messages, "max_tokens": 2,
                                                      "temperature": 0, "prompt_logprobs": N})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = app_client.post("/tokenize", json={"model": "beta", "messages": messages}).json()["tokens"]
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"] == len(ids)
    assert all("prompt_logprobs" not in c for c in body["choices"])
    with torch.no_grad():
        ref = peft_reference(tiny_model_dir, store, {"beta": 1.0})(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    _check_against(ref, ids, body["prompt_logprobs"], AppHandle(app_client.app).tokenizer)


def test_echo_logprobs_keep_their_own_width_beside_prompt_logprobs(app_client):
    body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 0, "echo": True, "logprobs": 1, "prompt_logprobs": 5}
    choice = app_client.post("/v1/completions", json=body).json()["choices"][0]
    assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"][1:])  # the one asked for + the token
    assert all(5 <= len(entry) <= 6 for entry in choice["prompt_logprobs"][1:])
    zero = app_client.post("/v1/completions", json={**body, "prompt_logprobs": 0}).json()["choices"][0]
    assert [list(e) for e in zero["prompt_logprobs"][1:]] == [[str(i)] for i in PROMPTS[0][1:]]
    assert zero["logprobs"] == choice["logprobs"]


@pytest.mark.parametrize("path,extra", [("/v1/completions", {"prompt": "a b"}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})])
def test_bad_prompt_logprobs_are_a_400_in_openai_shape(app_client, path, extra):
    for value, stream in ((-1, False), (21, False), ("3", False), (2, True)):
        r = app_client.post(path, json={"model": "alpha", "max_tokens": 2, "prompt_logprobs": value, "stream": stream,
                                        **extra})
        assert r.status_code == 400, (value, stream, r.text)
        error = r.json()["error"]
        assert error["param"] == "prompt_logprobs" and error["type"] == "invalid_request_error" and error["message"]
