"""The first routing decision embeds the whole prompt with the `base` embedder too: the server's
weights equal the router applied to `BaseEmbedder(window=None)` over the prompt (HF forward)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import GPT2LMHeadModel

from router_core import BaseEmbedder, CentroidRouter, fit_centroids
from server.app import create_app
from tests.conftest import ADMIN
from tests.tiny import app_settings, build_tokenizer

EXAMPLES = {"alpha": ["def add(a, b):\n    return a + b", "for i in range(10):\n    print(i)"],
            "beta": ["It was a dark and stormy night.", "She smiled and read the letter again."]}
PROMPT = "import os\nfor name in os.listdir('.'):\n    print(name)\n" + " The old man walked home slowly in the rain." * 2


@pytest.mark.parametrize("prompt_tokens", [None, 0])
def test_base_embedder_first_decision_pools_the_prompt(store, tiny_model_dir, prompt_tokens):
    routing = {"embedder": "base", "route_temperature": 1.0}
    if prompt_tokens is not None:
        routing["route_prompt_tokens"] = prompt_tokens
    tok = build_tokenizer()
    ids = tok.encode(PROMPT)
    assert 40 < len(ids) < 100  # longer than the route window, within the tiny model's context
    hf = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    embedder = BaseEmbedder(hf, tok, window=None)
    text = PROMPT if prompt_tokens is None else tok.decode(ids[-32:])  # 0 = the route window, as before
    with torch.no_grad():
        router = CentroidRouter(list(EXAMPLES), [fit_centroids(embedder.embed_texts(EXAMPLES[n]), k=64) for n in EXAMPLES])
        expected = router.route(embedder.embed_texts([text]))[0]  # [2]
    with TestClient(create_app(app_settings(tiny_model_dir, store, routing=routing))) as client:
        for name, examples in EXAMPLES.items():
            r = client.post("/admin/adapters", json={"name": name, "path": name, "examples": examples}, headers=ADMIN)
            assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"model": "auto", "prompt": PROMPT, "max_tokens": 4,
                                                 "routing": {"reroute_every": 2}})
        assert r.status_code == 200, r.text
        first = r.json()["choices"][0]["routing"][0]
    assert first["start_token"] == 0
    got = torch.tensor([first["weights"][n] for n in EXAMPLES])
    assert torch.allclose(got, expected, atol=2e-4), (got, expected)
