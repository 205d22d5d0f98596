"""pool_hidden math, the `base` embedder on a tiny GPT-2, and a tiny in-code sentence encoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from router_core import BaseEmbedder, Embedder, SentenceEncoder, pool_hidden
from router_core.embedders import encoder_id, encoder_name_from_path
from tests.tiny import build_model, build_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "It is a truth universally acknowledged, that a single man",
    "x",
    "",
]


def test_pool_hidden_matches_manual_mean() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)  # [n, T, d]
    lengths = torch.tensor([5, 3, 1])
    out = pool_hidden(hidden, lengths)  # [3, 4]
    manual = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0), hidden[2, 0]])
    assert torch.allclose(out, F.normalize(manual, dim=-1), atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3))


def test_pool_hidden_window() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 3, 1])
    out = pool_hidden(hidden, lengths, window=2)
    manual = torch.stack([hidden[0, 3:5].mean(0), hidden[1, 1:3].mean(0), hidden[2, 0]])
    assert torch.allclose(out, F.normalize(manual, dim=-1), atol=1e-6)
    # No lengths: every position is valid.
    assert torch.allclose(pool_hidden(hidden, window=5), pool_hidden(hidden, torch.tensor([5, 5, 5])))


def test_pool_hidden_ignores_padding_even_nan() -> None:
    hidden = torch.randn(2, 4, 3)
    hidden[0, 2:] = float("nan")  # garbage in the padded positions
    out = pool_hidden(hidden, torch.tensor([2, 0]))
    assert torch.allclose(out[0], F.normalize(hidden[0, :2].mean(0), dim=0), atol=1e-6)
    assert torch.equal(out[1], torch.zeros(3))  # empty row: zeros, not NaN


def test_pool_hidden_mask_any_padding_side() -> None:
    torch.manual_seed(1)
    right = torch.randn(2, 5, 4)
    lengths = torch.tensor([5, 3])
    left = right.clone()
    left[1] = torch.cat([torch.zeros(2, 4), right[1, :3]])  # the same row, left-padded
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    for window in (None, 2):
        assert torch.allclose(
            pool_hidden(left, mask=mask, window=window), pool_hidden(right, lengths, window)
        )


def test_pool_hidden_half_precision_and_errors() -> None:
    out = pool_hidden(torch.randn(2, 3, 4, dtype=torch.float16))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError):
        pool_hidden(torch.randn(3, 4))
    with pytest.raises(ValueError):
        pool_hidden(torch.randn(1, 3, 4), window=0)


@pytest.fixture(scope="module")
def tiny():
    return build_model(seed=0)


def test_base_embedder_batch_equals_single(tiny) -> None:
    model, tok = tiny
    emb = BaseEmbedder(model, tok, batch_size=3)
    assert isinstance(emb, Embedder)
    assert (emb.id, emb.dim) == ("base", 64)
    batch = emb.embed_texts(TEXTS)  # [4, 64]
    assert batch.shape == (4, 64) and batch.dtype == torch.float32
    assert torch.allclose(batch.norm(dim=-1), torch.ones(4), atol=1e-5)
    single = torch.cat([emb.embed_texts([t]) for t in TEXTS])
    assert torch.allclose(batch, single, atol=1e-5)  # padding and batching change nothing
    # Same math as the engine: pool_hidden over the model's own last hidden state.
    ids = tok(TEXTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.transformer(ids).last_hidden_state  # [1, T, 64]
    assert torch.allclose(batch[1], pool_hidden(hidden)[0], atol=1e-5)


def test_base_embedder_window_and_truncation(tiny) -> None:
    model, tok = tiny
    emb = BaseEmbedder(model, tok, window=4)
    assert emb.id == "base:4"
    text = TEXTS[1]
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.transformer(ids).last_hidden_state
    assert torch.allclose(emb.embed_texts([text])[0], pool_hidden(hidden, window=4)[0], atol=1e-5)
    # Truncation keeps the newest tokens.
    short = BaseEmbedder(model, tok, max_length=6)
    with torch.no_grad():
        tail = model.transformer(ids[:, -6:]).last_hidden_state
    assert torch.allclose(short.embed_texts([text])[0], pool_hidden(tail)[0], atol=1e-5)


def test_base_embedder_with_hidden_fn(tiny) -> None:
    model, tok = tiny
    calls = []

    def hidden_fn(input_ids, attention_mask):
        calls.append(tuple(input_ids.shape))
        return model.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with pytest.raises(ValueError, match="dim"):
        BaseEmbedder(hidden_fn, tok)
    emb = BaseEmbedder(hidden_fn, tok, dim=64, batch_size=8)
    assert torch.allclose(
        emb.embed_texts(TEXTS[:2]), BaseEmbedder(model, tok).embed_texts(TEXTS[:2]), atol=1e-5
    )
    assert len(calls) == 1 and calls[0][0] == 2  # one batched forward
    assert emb.embed_texts([]).shape == (0, 64)


def test_sentence_encoder_in_code() -> None:
    tok = build_tokenizer()
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    enc = SentenceEncoder(bert, tok, name="tiny-encoder", batch_size=2, max_length=16)
    assert (enc.id, enc.dim) == ("bert:tiny-encoder", 32)
    assert isinstance(enc, Embedder)
    texts = TEXTS[:3]
    batch = enc.embed_texts(texts)  # [3, 32], batched by length then restored to input order
    single = torch.cat([enc.embed_texts([t]) for t in texts])
    assert torch.allclose(batch, single, atol=1e-5)
    assert torch.allclose(batch.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert enc.embed_texts([]).shape == (0, 32)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/x/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/" + "a" * 40, "all-MiniLM-L6-v2"),
        ("/opt/models/all-MiniLM-L6-v2/", "all-MiniLM-L6-v2"),
        ("/opt/paraphrase-mpnet/model", "paraphrase-mpnet"),
        ("C:\\models\\e5-small", "e5-small"),
    ],
)
def test_encoder_names(path: str, name: str) -> None:
    assert encoder_name_from_path(path) == name


def test_encoder_id() -> None:
    assert encoder_id("all-MiniLM-L6-v2", "bert") == "minilm:all-MiniLM-L6-v2"
    assert encoder_id("e5 small", "bert") == "bert:e5-small"
