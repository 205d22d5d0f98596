"""`--quant int8`: weight-only int8 base weights against a float reference.

Tolerance, stated: per-channel symmetric int8 rounds each weight by at most half its row's
scale (amax/127 / 2, i.e. ≤ 0.4 % of the row's largest weight), and the kernel rounds the
activations to bf16 (2^-9 relative). For a dot product over `in` inputs those errors are
independent and average out, so the output's relative error (Frobenius norm over a batch) is
about 0.5 % on Gaussian weights; the tests demand ≤ 2 %, and that the LoRA delta on top of the
int8 base is the float delta (LoRA factors and gates stay float) to ≤ 2 % of its own size.
"""

from __future__ import annotations

import pytest
import torch

from server.engine import gpt2
from server.engine.quant import Int8Linear, int8pack_works, quantize_per_channel
from server.settings import EngineSettings, ModelSettings, Settings
from tests.server.engine.rows import PROMPT, assert_quantised_engine_close, hold, row, tiny_engine, token_ids
from tests.tiny import run_engine


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_per_channel_quantisation_is_within_half_a_scale():
    w = torch.randn(48, 80) * torch.logspace(-2, 0, 48)[:, None]  # rows of very different magnitude
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.shape == w.shape and s.shape == (48,)
    err = (q.float() * s.float()[:, None] - w).abs()
    assert bool((err <= s.float()[:, None] / 2 + 1e-7).all())  # each weight within half its row's step
    assert int(q.abs().max()) == 127  # every row uses the full range (one scale per row, not per tensor)


@pytest.mark.parametrize("rows", [1, 8, 40, 120])  # 120 > max_rows: the dequantised path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_the_float_linear(rows, dtype):
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=gen) * 0.05, torch.randn(96, generator=gen) * 0.1
    x = torch.randn(rows, 64, generator=gen)
    lin = Int8Linear(w, b.to(dtype))
    with torch.inference_mode():
        got = lin(x.to(dtype))
    assert got.dtype == dtype and got.shape == (rows, 96)
    assert _rel(got.float(), x @ w.t() + b) < 0.02
    assert rows != 120 or rows > Int8Linear.max_rows  # the largest case really takes the dequantised path
    if rows <= Int8Linear.max_rows and lin.kernel:  # the kernel and the dequantised matmul agree
        dense = torch.nn.functional.linear(x.to(dtype), lin.dequantized(dtype), b.to(dtype))
        assert _rel(got.float(), dense.float()) < 0.01


def test_the_kernel_is_used_on_this_cpu():
    assert int8pack_works("cpu")  # otherwise --quant int8 is correct but not faster: say so loudly


def test_int8_engine_against_the_float_engine(store, tiny_model_dir):
    """Same tiny model, same adapters: int8 base logits within the tolerance of the float ones,
    the LoRA mixture's delta unchanged, the state_dict (and so the fingerprint) untouched."""
    e32, e8 = tiny_engine(store, tiny_model_dir), tiny_engine(store, tiny_model_dir, quant="int8")
    assert e8.resident.quant == "int8" and e32.resident.quant == "none"
    assert e8.resident.fingerprint == e32.resident.fingerprint
    assert e8.resident.model.state_dict().keys() == e32.resident.model.state_dict().keys()
    layer = e8.slots.layers["transformer.h.0.attn.c_attn"]
    assert layer.int8 is not None and layer.int8.qweight.dtype == torch.int8
    assert_quantised_engine_close(e32, e8, 0.02)


def test_int8_greedy_decode_agrees_with_float(store, tiny_model_dir):
    """Greedy decoding through the int8 kernel (one row per step) agrees with the float engine
    token for token, up to a first difference that may only come where float's top two logits
    were within the tolerance of each other (then either choice is a faithful rounding)."""
    e8, e32 = tiny_engine(store, tiny_model_dir, quant="int8"), tiny_engine(store, tiny_model_dir)
    weights = {"alpha": 0.5, "beta": 0.5}
    a, b = hold(e8, row(PROMPT, weights, max_tokens=16)), hold(e32, row(PROMPT, weights, max_tokens=16))
    t8, t32 = token_ids(run_engine(e8, [a])[a.id]), token_ids(run_engine(e32, [b])[b.id])
    assert len(t8) == 16
    same = next((i for i, (x, y) in enumerate(zip(t8, t32, strict=True)) if x != y), len(t8))
    if same < len(t8):  # a disagreement only where float's top two logits were within the tolerance
        ids = torch.tensor([PROMPT + t32[:same]])
        versions = [e32.registry.get(n) for n in weights]
        e32.ctx.set(tuple(e32.slots.ensure(versions)), torch.tensor([list(weights.values())]), None)
        with torch.inference_mode():
            logits, _ = gpt2.forward(e32.resident.model, ids, torch.arange(ids.shape[1])[None], e32.cache)
        e32.ctx.clear()
        top = logits[0].topk(2).values
        assert (top[0] - top[1]).item() < 0.05 * max(float(logits[0].abs().max()), 1.0)


def test_settings_refuse_int8_with_the_compiled_step():
    with pytest.raises(ValueError, match="eager decode step"):
        Settings(model=ModelSettings(quant="int8"), engine=EngineSettings(compile="on"))
    assert Settings(model=ModelSettings(quant="int8"), engine=EngineSettings(compile="off")).model.quant == "int8"


def test_models_and_version_report_the_quantisation(store, tiny_model_dir, app_client):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.tiny import app_settings

    base = app_client.get("/v1/models").json()["data"][0]
    assert base["quantization"] == "none" and base["dtype"] == "float32"
    assert app_client.get("/version").json()["quantization"] == "none"
    assert app_client.get("/version").json()["quantization_kernel"] == ""
    with TestClient(create_app(app_settings(tiny_model_dir, store, model={"quant": "int8"}))) as client:
        base = client.get("/v1/models").json()["data"][0]
        assert base["quantization"] == "int8" and base["dtype"] == "float32"
        assert client.get("/version").json()["quantization"] == "int8"
        from server.kernels import native

        kernel = client.get("/version").json()["quantization_kernel"]  # which kernel reads the int8 weights
        assert kernel == ("native-avx2" if native.load() is not None else "torch-int8pack")
        body = client.post("/v1/completions", json={"model": "alpha", "prompt": "hello", "max_tokens": 4,
                                                    "temperature": 0}).json()
        assert body["usage"]["completion_tokens"] == 4


def test_compile_auto_keeps_int8_on_the_eager_step(monkeypatch):
    import types

    from server import build

    monkeypatch.setattr(build, "step_for", lambda setting, device: "compiled")  # what auto picks on CUDA
    settings = EngineSettings(compile="auto")
    assert build._step(settings, types.SimpleNamespace(quant="int8", device=torch.device("cuda"))) == "eager"
    assert build._step(settings, types.SimpleNamespace(quant="none", device=torch.device("cuda"))) == "compiled"
