"""vLLM's sampling and output fields beyond OpenAI's, each checked against what it must mean:
`min_p`, `bad_words`, `include_stop_str_in_output`, `skip_special_tokens`, `truncate_prompt_tokens`,
`return_tokens_as_token_ids`, `continuous_usage_stats`, chat `echo` / `add_generation_prompt` /
`chat_template_kwargs`, and `/tokenize` / `/detokenize`."""

from __future__ import annotations

import json

PROMPT = "def add(a, b):"


def _complete(client, **body):
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0,
                                             **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_min_p_one_keeps_only_the_most_likely(app_client):
    greedy = _complete(app_client)["choices"][0]["text"]
    assert _complete(app_client, temperature=1.0, seed=3, min_p=1.0)["choices"][0]["text"] == greedy
    assert _complete(app_client, temperature=1.0, seed=3, min_p=0.0)["choices"][0]["text"] != greedy


def test_bad_words_never_appear(app_client):
    tok = app_client.post("/tokenize", json={"prompt": PROMPT}).json()
    greedy = _complete(app_client, logprobs=0)
    first = greedy["choices"][0]["logprobs"]["tokens"][0]
    banned = _complete(app_client, bad_words=[first], logprobs=0)["choices"][0]
    assert banned["logprobs"]["tokens"][0] != first and first not in banned["logprobs"]["tokens"]
    assert tok["count"] > 0


def test_include_stop_str_in_output(app_client):
    text = _complete(app_client, max_tokens=12)["choices"][0]["text"]
    stop = text[3:5]
    cut = _complete(app_client, max_tokens=12, stop=[stop])["choices"][0]
    kept = _complete(app_client, max_tokens=12, stop=[stop], include_stop_str_in_output=True)["choices"][0]
    assert cut["finish_reason"] == kept["finish_reason"] == "stop"
    assert kept["text"] == cut["text"] + stop and text.startswith(kept["text"])


def test_skip_special_tokens_false_keeps_eos_text(app_client):
    body = {"logit_bias": {"0": 100}, "ignore_eos": True, "max_tokens": 3}  # id 0 is <|endoftext|>
    assert _complete(app_client, **body)["choices"][0]["text"] == ""
    assert _complete(app_client, skip_special_tokens=False, **body)["choices"][0]["text"] == "<|endoftext|>" * 3


def test_truncate_prompt_tokens_keeps_the_last_k(app_client):
    ids = app_client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    cut = _complete(app_client, truncate_prompt_tokens=3)
    assert cut["usage"]["prompt_tokens"] == 3
    assert cut["choices"][0]["text"] == _complete(app_client, prompt=ids[-3:])["choices"][0]["text"]


def test_return_tokens_as_token_ids(app_client):
    lp = _complete(app_client, logprobs=1, return_tokens_as_token_ids=True)["choices"][0]["logprobs"]
    assert all(t.startswith("token_id:") for t in lp["tokens"])
    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    text = app_client.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == _complete(app_client)["choices"][0]["text"]


def test_continuous_usage_stats(app_client):
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 5, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with app_client.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert counts == [1, 2, 3, 4, 5]


def test_tokenize_and_detokenize(app_client):
    r = app_client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == 128
    assert app_client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": PROMPT}
    messages = [{"role": "user", "content": PROMPT}]
    chat = app_client.post("/v1/chat/completions", json={"model": "alpha", "messages": messages, "max_tokens": 1}).json()
    assert app_client.post("/tokenize", json={"messages": messages}).json()["count"] == chat["usage"]["prompt_tokens"]
    bare = app_client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()["count"]
    assert bare < chat["usage"]["prompt_tokens"]
    assert app_client.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert app_client.post("/tokenize", json={}).status_code == 400


def test_chat_echo_and_template_kwargs(app_client):
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "return"}]
    body = {"model": "alpha", "messages": messages, "max_tokens": 4, "temperature": 0.0}
    plain = app_client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    echoed = app_client.post("/v1/chat/completions", json={**body, "echo": True}).json()["choices"][0]["message"]["content"]
    assert echoed == "return" + plain
    with app_client.stream("POST", "/v1/chat/completions", json={**body, "echo": True, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == echoed
    # the default template has no variables of its own: extra ones change nothing and are accepted
    kw = app_client.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"enable_thinking": False}})
    assert kw.status_code == 200 and kw.json()["choices"][0]["message"]["content"] == plain
