"""Penalties, min_tokens, ignore_eos and stop_token_ids change the output, each as its reference
defines it: transformers' `generate()` for repetition_penalty and min_new_tokens, OpenAI's
published formula for presence/frequency penalties; and a failing row fails alone."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, GPT2LMHeadModel

from server.engine.base_model import load_base_model
from server.engine.engine import Engine, EngineConfig
from server.engine.penalties import openai_penalties
from server.engine.registry import AdapterRegistry
from server.engine.sampling import SamplingParams
from server.engine.sequence import RoutingSpec, Sequence
from tests.tiny import run_engine

PROMPT = "the cat sat on the mat and the cat"


@pytest.fixture()
def peft_alpha(store, tiny_model_dir):
    base = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    return PeftModel.from_pretrained(base, store / "alpha", adapter_name="alpha").eval()


@pytest.fixture()
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _completion(client, **body) -> dict:
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _hf_generate(model, tok, n: int, **kw) -> list[int]:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id, **kw)
    return out[0, ids.shape[1]:].tolist()


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def test_repetition_penalty_equals_transformers_generate(app_client, peft_alpha, tok):
    plain = _completion(app_client, max_tokens=16)["text"]
    got = _completion(app_client, max_tokens=16, repetition_penalty=2.5)["text"]
    ref = _hf_generate(peft_alpha, tok, 16, repetition_penalty=2.5, eos_token_id=None)
    assert got == _text(tok, ref)
    assert got != plain  # the penalty really changed the greedy output


def test_min_tokens_equals_transformers_min_new_tokens(app_client, peft_alpha, tok):
    eos = tok.eos_token_id
    bias = {str(eos): 100}  # EOS would be chosen at once
    first = _completion(app_client, max_tokens=8, logit_bias=bias)
    assert first["finish_reason"] == "stop" and first["text"] == ""
    held = _completion(app_client, max_tokens=8, logit_bias=bias, min_tokens=3, logprobs=0)
    ref = _hf_generate(peft_alpha, tok, 8, min_new_tokens=3, sequence_bias={(eos,): 100.0}, eos_token_id=eos)
    assert ref[3] == eos and eos not in ref[:3]
    assert held["finish_reason"] == "stop"
    assert held["text"] == _text(tok, ref)
    assert len(held["logprobs"]["tokens"]) == 4  # three held-back tokens, then EOS


def test_presence_frequency_penalties_follow_openai_formula(app_client, peft_alpha, tok):
    presence, frequency, n = 0.7, 1.3, 16
    ids = tok(PROMPT, return_tensors="pt").input_ids[0].tolist()
    generated: list[int] = []
    with torch.no_grad():  # OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence, over generated tokens
        for _ in range(n):
            logits = peft_alpha(torch.tensor([ids + generated])).logits[0, -1].clone()
            for j in set(generated):
                c = generated.count(j)
                logits[j] -= c * frequency + presence
            generated.append(int(logits.argmax()))
    got = _completion(app_client, max_tokens=n, presence_penalty=presence, frequency_penalty=frequency)
    assert got["text"] == _text(tok, generated)
    assert got["text"] != _completion(app_client, max_tokens=n)["text"]


def test_openai_penalties_unit():
    scores = torch.randn(1, 50)
    generated = [3, 3, 7, 3, 49]
    got = openai_penalties(scores, generated, presence=0.5, frequency=0.25)
    ref = scores.clone()
    for j in set(generated):
        ref[0, j] -= generated.count(j) * 0.25 + 0.5
    assert torch.allclose(got, ref)


def test_ignore_eos_keeps_generating(app_client, tok):
    bias = {str(tok.eos_token_id): 100}
    got = _completion(app_client, max_tokens=5, logit_bias=bias, ignore_eos=True, logprobs=0)
    assert got["finish_reason"] == "length"
    assert len(got["logprobs"]["tokens"]) == 5


def test_stop_token_ids_end_the_completion(app_client, peft_alpha, tok):
    ref = _hf_generate(peft_alpha, tok, 12, eos_token_id=None)
    assert _completion(app_client, max_tokens=12)["text"] == _text(tok, ref)
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])  # stopping there is unambiguous
    got = _completion(app_client, max_tokens=12, stop_token_ids=[ref[k]], logprobs=0)
    assert got["finish_reason"] == "stop"
    assert got["text"] == _text(tok, ref[:k])  # the stop token itself is not part of the text
    assert len(got["logprobs"]["tokens"]) == k + 1


def test_a_failing_row_fails_alone(store, tiny_model_dir):
    """A row whose logits processing raises (here: a repetition penalty transformers refuses)
    finishes with its own error; the other rows of the same batch complete normally."""
    from server.engine.adapter_weights import BaseSpec
    from server.store.folder import read_adapter

    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    registry = AdapterRegistry()
    registry.register(read_adapter("alpha", store / "alpha", BaseSpec(resident.module_shapes, resident.fingerprint, 64)))
    engine = Engine(resident, registry, EngineConfig(max_loras=2))

    def seq(**sampling) -> Sequence:
        s = Sequence(prompt_ids=[5, 6, 7, 8], max_tokens=6, sampling=SamplingParams(temperature=0.0, **sampling),
                     routing=RoutingSpec("fixed", {"alpha": 1.0}), decode=lambda ids: "", emit=lambda ev: None)
        s.versions = {v.name: v for v in registry.acquire(["alpha"])}
        return s

    good, bad, penalised = seq(), seq(repetition_penalty=-1.0), seq(repetition_penalty=1.5)
    events = run_engine(engine, [good, bad, penalised])
    assert [e.finish_reason for e in events[good.id]][-1] == "length"
    assert len([e for e in events[good.id] if e.token_id is not None]) == 6
    assert len([e for e in events[penalised.id] if e.token_id is not None]) == 6
    last = events[bad.id][-1]
    assert last.finish_reason == "error" and last.error is not None and last.error.status_code == 500
    assert "penalty" in str(last.error)
    assert all(v.refcount == 0 for v in registry.snapshot().values())
