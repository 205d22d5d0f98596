"""Token ids a request names are bounded by the model's embedding table as well as the tokenizer:
a tokenizer with added tokens can outgrow the table, and an id past it is a device-side assert
on CUDA that poisons the CUDA context (every later request fails while /health stays green)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.app import create_app
from tests.tiny import app_settings, build_model


def test_ids_past_the_embedding_table_are_refused(tmp_path):
    model, tokenizer = build_model()
    table = len(tokenizer) - 50  # the tokenizer knows 50 ids the model has no embedding for
    model.resize_token_embeddings(table)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    settings = app_settings(tmp_path / "model", tmp_path / "store")
    with TestClient(create_app(settings)) as client:
        def complete(**body):
            return client.post("/v1/completions", json={"model": "base", "max_tokens": 2, "temperature": 0, **body})

        for body in ({"prompt": [5, table]}, {"prompt": [[5], [len(tokenizer) - 1]]},
                     {"prompt": "x", "logit_bias": {str(table + 3): 1}},
                     {"prompt": "x", "stop_token_ids": [table]}):
            r = complete(**body)
            assert r.status_code == 400, (body, r.text)
            assert str(table) in r.json()["error"]["message"]
        assert complete(prompt=[5, table - 1], logit_bias={str(table - 1): 1}).status_code == 200
