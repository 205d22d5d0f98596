"""Log-probs and echo as OpenAI/vLLM define them; prompt log-probs equal HF's
`model(ids).logits.log_softmax` for the same adapter or mixture (PEFT, cat merge) to 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

from tests.handle import AppHandle
from tests.tiny import peft_reference

PROMPTS = [[5, 17, 42, 8, 99, 3, 250, 11, 64], [7, 1, 300, 2, 9]]


@pytest.mark.parametrize("model,weights", [("alpha", {"alpha": 1.0}), ("auto", {"alpha": 0.3, "beta": 0.7}),
                                           ("base", None)])
def test_prompt_logprobs_equal_hf_log_softmax(app_client, store, tiny_model_dir, model, weights):
    body = {"model": model, "prompt": PROMPTS, "max_tokens": 0, "echo": True, "logprobs": 5}
    if model == "auto":
        body["routing"] = {"weights": weights}
    if model == "base":
        body["model"] = tiny_model_dir.name
    r = app_client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    ref_model = peft_reference(tiny_model_dir, store, weights)
    tok = AppHandle(app_client.app).tokenizer
    for ids, choice in zip(PROMPTS, r.json()["choices"], strict=True):
        assert choice["finish_reason"] == "length"
        assert choice["text"] == tok.decode(ids)  # echo: the prompt, and nothing generated
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [T, V]
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor(lp["token_logprobs"][1:])
        assert (got - want).abs().max().item() <= 1e-4
        compared = 0
        for t in range(1, len(ids)):  # the five most likely, plus the prompt's own token
            top = torch.topk(ref[t - 1], 5)
            alternatives = lp["top_logprobs"][t]
            texts = [tok.decode([i]) for i in [*top.indices.tolist(), ids[t]]]
            assert set(texts) == set(alternatives)
            for text, value in zip(texts, top.values.tolist(), strict=False):
                if texts.count(text) == 1:  # byte tokens that decode alike share one key
                    assert abs(alternatives[text] - value) <= 1e-4
                    compared += 1
        assert compared >= 2 * (len(ids) - 1)
        assert lp["tokens"] == [tok.decode([i]) for i in ids]
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(ids))]
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == sum(map(len, PROMPTS)) and usage["completion_tokens"] == 0


def test_echo_then_completion_and_generated_top_logprobs(app_client):
    prompt = "def add(a, b):"
    plain = app_client.post("/v1/completions", json={"model": "beta", "prompt": prompt, "max_tokens": 6,
                                                      "temperature": 0, "logprobs": 3}).json()["choices"][0]
    echoed = app_client.post("/v1/completions", json={"model": "beta", "prompt": prompt, "max_tokens": 6,
                                                       "temperature": 0, "logprobs": 3, "echo": True}).json()["choices"][0]
    assert echoed["text"] == prompt + plain["text"]
    n_prompt = len(echoed["logprobs"]["tokens"]) - 6
    assert echoed["logprobs"]["token_logprobs"][n_prompt:] == plain["logprobs"]["token_logprobs"]
    assert plain["logprobs"]["text_offset"][0] == 0
    assert echoed["logprobs"]["text_offset"][n_prompt] == sum(len(t) for t in echoed["logprobs"]["tokens"][:n_prompt])
    for token, chosen, top in zip(plain["logprobs"]["tokens"], plain["logprobs"]["token_logprobs"],
                                  plain["logprobs"]["top_logprobs"], strict=True):
        assert top[token] == chosen
        assert max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy chose the most likely
        assert 1 <= len(top) <= 4  # 3 alternatives + the chosen one; byte tokens that decode alike share a key


def test_stream_chunks_carry_logprobs(app_client):
    body = {"model": "alpha", "prompt": "Mr. Holmes", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    full = app_client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    r = app_client.post("/v1/completions", json={**body, "stream": True, "echo": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    lps = [c["choices"][0]["logprobs"] for c in chunks]
    echo, rest = lps[0], lps[1:]
    assert chunks[0]["choices"][0]["text"] == "Mr. Holmes" and echo["token_logprobs"][0] is None
    assert [t for lp in rest for t in lp["token_logprobs"]] == full["token_logprobs"]
    assert [t for lp in rest for t in lp["top_logprobs"]] == full["top_logprobs"]
    offsets = [o for lp in lps for o in lp["text_offset"]]
    tokens = [t for lp in lps for t in lp["tokens"]]
    assert offsets == [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]


def test_token_id_list_prompts_equal_text_prompts(app_client):
    tok = AppHandle(app_client.app).tokenizer
    texts = ["def add(a, b):", "Mr. Holmes"]
    by_text = app_client.post("/v1/completions", json={"model": "alpha", "prompt": texts, "max_tokens": 5,
                                                        "temperature": 0}).json()
    by_ids = app_client.post("/v1/completions", json={"model": "alpha", "prompt": [tok.encode(t) for t in texts],
                                                       "max_tokens": 5, "temperature": 0}).json()
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]


def test_n_choices_and_best_of(app_client):
    r = app_client.post("/v1/completions", json={"model": "alpha", "prompt": ["a", "b"], "max_tokens": 4, "n": 3,
                                                  "best_of": 3, "temperature": 1.0, "seed": 1})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    assert len({c["text"] for c in choices[:3]}) > 1  # the copies are sampled independently
    again = app_client.post("/v1/completions", json={"model": "alpha", "prompt": ["a", "b"], "max_tokens": 4, "n": 3,
                                                      "temperature": 1.0, "seed": 1}).json()["choices"]
    assert [c["text"] for c in again] == [c["text"] for c in choices]  # seeded: reproducible
    assert r.json()["usage"]["prompt_tokens"] == 2  # each prompt counted once


def test_best_of_returns_the_candidates_with_the_highest_cumulative_logprob(app_client):
    """best_of 4, n 2: the same seeded candidates as n 4 (whose token log-probs give the
    reference ranking), of which the two with the highest sum come back; usage bills all four."""
    body = {"model": "alpha", "prompt": ["a", "def f"], "max_tokens": 4, "temperature": 1.0, "seed": 3,
            "ignore_eos": True}
    all4 = app_client.post("/v1/completions", json={**body, "n": 4, "logprobs": 0}).json()["choices"]
    r = app_client.post("/v1/completions", json={**body, "n": 2, "best_of": 4})
    assert r.status_code == 200, r.text
    got = [c["text"] for c in r.json()["choices"]]
    want = []
    for start in (0, 4):
        group = all4[start:start + 4]
        assert len({c["text"] for c in group}) > 1  # the candidates differ, so the ranking decides
        ranked = sorted(group, key=lambda c: -sum(c["logprobs"]["token_logprobs"]))
        want += [c["text"] for c in ranked[:2]]
    assert got == want
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert r.json()["usage"]["completion_tokens"] == 2 * 4 * 4


def test_a_full_context_window_can_be_scored(app_client):
    limit = AppHandle(app_client.app).resident.max_positions
    window = [(7 * i) % 300 + 1 for i in range(limit)]
    r = app_client.post("/v1/completions", json={"model": "alpha", "prompt": window, "max_tokens": 0, "echo": True,
                                                  "logprobs": 0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == limit
    over = app_client.post("/v1/completions", json={"model": "alpha", "prompt": window, "max_tokens": 1})
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_fields_are_accepted_and_logged_once(app_client, caplog):
    body = {"model": "alpha", "prompt": "x", "max_tokens": 1, "some_vendor_option_xyz": 1}
    with caplog.at_level("WARNING", logger="server.serving.request_fields"):
        for _ in range(3):
            assert app_client.post("/v1/completions", json=body).status_code == 200
    assert sum("some_vendor_option_xyz" in rec.getMessage() for rec in caplog.records) == 1


def test_prompt_scores_in_chunks_equal_one_pass(monkeypatch):
    from server.engine import prompt_logprobs as engine_logprobs
    from tests.tiny import build_model

    model, _ = build_model()
    ids = [(11 * i) % 397 + 1 for i in range(100)]
    with torch.no_grad():
        hidden = model.transformer(torch.tensor([ids])).last_hidden_state[0]  # [T, d]
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    whole = engine_logprobs.score_prompt(model, hidden, ids, 3)
    monkeypatch.setattr(engine_logprobs, "CHUNK", 7)
    chunked = engine_logprobs.score_prompt(model, hidden, ids, 3)
    assert len(chunked.logprobs) == len(ids) and chunked.logprobs[0] is None
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(chunked.logprobs[1:]), want, atol=1e-4)
    assert torch.allclose(torch.tensor(chunked.logprobs[1:]), torch.tensor(whole.logprobs[1:]), atol=1e-5)
    assert [t is None for t in chunked.top] == [t is None for t in whole.top] == [True] + [False] * (len(ids) - 1)
    assert [[i for i, _ in t] for t in chunked.top[1:]] == [[i for i, _ in t] for t in whole.top[1:]]
