"""The batched device sampler (`server.engine.device_sampling`), the engine's sampler on CUDA, run
here on CPU by forcing it: greedy rows equal the CPU path's, draws follow the processed
distribution (temperature, top-k, top-p, bias), a seed reproduces its tokens alone or in any
batch, and the engine decodes through it."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine import device_sampling, tokens
from server.engine.device_sampling import device_generator, sample_on_device
from server.engine.sampling import SamplingParams, sample_batch
from tests.server.engine.rows import PROMPT, held_row, tiny_engine, token_ids
from tests.tiny import run_engine


def test_greedy_rows_equal_the_cpu_path():
    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, top_logprobs=3),
              SamplingParams(temperature=0.0, logit_bias=((7, 100.0),)),
              SamplingParams(temperature=0.0, logit_bias=((1, -100.0), (2, 5.0)), top_logprobs=2),
              SamplingParams(temperature=0.0)]
    got = sample_on_device(logits, params, [None] * 5)
    ref = sample_batch(logits, params, [None] * 5)
    for g, r in zip(got, ref, strict=True):
        assert not isinstance(r, Exception)
        assert g.token == r.token and math.isclose(g.logprob, r.logprob, abs_tol=1e-5)
        assert (g.top is None) == (r.top is None)
        if g.top is not None and r.top is not None:
            assert [t for t, _ in g.top] == [t for t, _ in r.top]
    assert got[2].token == 7


def _expected(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution `sampling.sample_row` draws from, computed directly."""
    scaled = logits / p.temperature
    if p.top_k:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    if p.top_p < 1.0:
        sp, order = torch.sort(probs, descending=True)
        drop = sp.cumsum(-1) - sp >= p.top_p
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), 0.0)
        probs = probs / probs.sum()
    return probs


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8), SamplingParams(temperature=1.3, top_k=4),
                                    SamplingParams(temperature=1.0, top_p=0.7),
                                    SamplingParams(temperature=0.7, top_k=6, top_p=0.9)])
def test_draws_follow_the_processed_distribution(params):
    torch.manual_seed(1)
    row = torch.randn(10) * 1.5
    n = 4000
    gens = [device_generator(1000 + i, torch.device("cpu")) for i in range(n)]
    picks = sample_on_device(row.expand(n, 10).contiguous(), [params] * n, gens)
    counts = torch.bincount(torch.tensor([p.token for p in picks]), minlength=10).double()
    expected = _expected(row, params).double()
    assert counts[expected == 0].sum() == 0, "a masked token was drawn"
    sigma = (n * expected * (1 - expected)).sqrt()
    assert ((counts - n * expected).abs() <= 4.5 * sigma + 1).all(), (counts / n, expected)
    assert all(math.isclose(p.logprob, float(row.log_softmax(-1)[p.token]), abs_tol=1e-5) for p in picks[:50])


def test_a_seed_gives_the_same_tokens_alone_and_in_any_batch():
    torch.manual_seed(2)
    steps = [torch.randn(4, 50) for _ in range(6)]
    params = [SamplingParams(temperature=1.0, seed=s) for s in (7, 8, 9, 10)]

    def run(rows: list[int], seeds: list[int]) -> list[list[int]]:
        gens = [device_generator(s, torch.device("cpu")) for s in seeds]
        return [[p.token for p in sample_on_device(logits[rows], [params[r] for r in rows], gens)] for logits in steps]

    alone = [t[0] for t in run([0], [7])]
    batched = [t[1] for t in run([2, 0, 3], [9, 7, 10])]
    assert alone == batched == [t[0] for t in run([0], [7])]
    assert alone != [t[0] for t in run([0], [8])]


def test_engine_decodes_through_the_device_sampler(store, tiny_model_dir, monkeypatch):
    """Forced on CPU: greedy rows give the CPU path's tokens, a seeded row its own tokens again,
    and a penalised row still takes the CPU path beside them."""
    def decode(force: bool) -> list[list[int]]:
        monkeypatch.setattr(tokens, "DEVICE_SAMPLING_ON_CPU", force)
        engine = tiny_engine(store, tiny_model_dir)
        seqs = [held_row(engine, PROMPT, {"alpha": 1.0}, max_tokens=8),
                held_row(engine, PROMPT[:5], {"beta": 1.0}, max_tokens=8, temperature=0.9, seed=11, top_k=20),
                held_row(engine, PROMPT[:4], {}, max_tokens=8, temperature=0.9, seed=12, repetition_penalty=1.3)]
        events = run_engine(engine, seqs)
        return [token_ids(events[s.id]) for s in seqs]

    calls = []
    real = device_sampling.sample_on_device
    monkeypatch.setattr(device_sampling, "sample_on_device", lambda *a: calls.append(len(a[1])) or real(*a))
    cpu = decode(False)
    assert not calls
    first, again = decode(True), decode(True)
    assert calls and max(calls) == 2  # the greedy and the seeded row; the penalised one stays on the CPU
    assert first == again
    assert first[0] == cpu[0] and first[2] == cpu[2]
    assert len(first[1]) == 8
