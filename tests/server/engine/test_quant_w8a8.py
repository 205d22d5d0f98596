"""`--quant w8a8`: int8 base weights and per-row int8 activations against a float reference.

Tolerance, stated: the weights are `quantize_per_channel`'s (≤ half a row's step, as for
`--quant int8`); each activation row is scaled into [-1, 1] and rounded to one of 127 levels
(fbgemm's `reduce_range`), a step of 2/127 of the row's largest magnitude, i.e. up to 0.8 % of it
per entry. Averaged over a dot product the output's relative error is about 1.5-2 % on Gaussian
inputs; the tests demand ≤ 4 %, and that a row's result does not depend on its batch (the kernel
quantises per tensor; the per-row scaling and the ±1 mark columns make it per row).
"""

from __future__ import annotations

import pytest
import torch

from server.engine.quant import W8A8Linear, quantize_per_channel, w8a8_works
from server.settings import EngineSettings, ModelSettings, Settings

pytestmark = pytest.mark.skipif(not w8a8_works("cpu"), reason="fbgemm's int8 GEMM is not in this torch build")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("rows", [1, 8, 120])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_matches_the_float_linear(rows, dtype):
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=gen) * 0.05, torch.randn(96, generator=gen) * 0.1
    x = torch.randn(rows, 64, generator=gen) * torch.logspace(-3, 2, rows)[:, None]  # rows far apart in size
    lin = W8A8Linear(w, b.to(dtype))
    with torch.inference_mode():
        got = lin(x.to(dtype))
    assert got.dtype == dtype and got.shape == (rows, 96)
    ref = x.to(dtype).float() @ w.t() + b.to(dtype).float()
    for i in range(rows):  # every row within the tolerance of its own size, small rows included
        assert _rel(got[i].float(), ref[i]) < 0.04, i
    q, s = quantize_per_channel(w)  # the same int8 weights as the weight-only path, zeros under the marks
    packed, _ = torch.ops.quantized.linear_unpack(lin.packed)
    assert torch.equal(packed.int_repr()[:, :64], q) and not packed.int_repr()[:, 64:].any()
    assert torch.equal(packed.q_per_channel_scales().to(torch.bfloat16), s)


def test_a_row_alone_equals_the_row_in_a_batch():
    """The kernel picks one activation scale for the whole input; without the per-row scaling a
    small row batched beside a large one would lose its precision (and change with its company)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(50, 40, generator=gen) * 0.1
    lin = W8A8Linear(w, torch.randn(50, generator=gen))
    x = torch.randn(6, 40, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 0.5, 2.0, 1e3])[:, None]
    x[3] = x[3].abs()  # a row with no negative entry
    x[4] = 0.0  # and one of zeros: the bias alone
    with torch.inference_mode():
        batched = lin(x)
        alone = torch.cat([lin(x[i:i + 1]) for i in range(6)])
        reordered = lin(x.flip(0)).flip(0)
    assert torch.equal(batched, alone) and torch.equal(batched, reordered)
    assert torch.equal(batched[4], lin.bias)
    assert _rel(batched[0], x[0] @ w.t() + lin.bias) < 0.04  # the 1e-3 row kept its own precision


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_row_stays_in_its_row(bad):
    """The kernel's range is the whole input's: a NaN or inf row must not move the others' grid
    (the engine fails a row with non-finite logits alone and keeps serving the rest)."""
    gen = torch.Generator().manual_seed(2)
    lin = W8A8Linear(torch.randn(64, 32, generator=gen) * 0.1, torch.randn(64, generator=gen))
    x = torch.randn(4, 32, generator=gen)
    with torch.inference_mode():
        clean = lin(x)
        x[1, 3] = bad
        dirty = lin(x)
    assert torch.equal(dirty[[0, 2, 3]], clean[[0, 2, 3]]) and not bool(dirty[1].isfinite().all())


def test_w8a8_engine_against_the_float_engine(store, tiny_model_dir):
    """Same tiny model, same adapters: base and mixture logits within the tolerance of the float
    engine's, the LoRA delta the float one, the state_dict untouched."""
    from tests.server.engine.rows import assert_quantised_engine_close, tiny_engine

    e32, eq = tiny_engine(store, tiny_model_dir), tiny_engine(store, tiny_model_dir, quant="w8a8")
    assert eq.resident.quant == "w8a8" and eq.resident.fingerprint == e32.resident.fingerprint
    assert isinstance(eq.slots.layers["transformer.h.0.attn.c_attn"].int8, W8A8Linear)
    assert isinstance(eq.resident.model.lm_head_int8, W8A8Linear)
    assert_quantised_engine_close(e32, eq, 0.04)


def test_settings_refuse_w8a8_with_the_compiled_step():
    with pytest.raises(ValueError, match="w8a8 runs the eager decode step"):
        Settings(model=ModelSettings(quant="w8a8"), engine=EngineSettings(compile="on"))


def test_w8a8_is_refused_on_cuda_with_a_clear_error():
    from server.engine.base_model import resolve_quant
    from server.engine.errors import ModelLoadError

    assert not w8a8_works("cuda")  # fbgemm is a CPU kernel
    with pytest.raises(ModelLoadError, match="CPU kernel"):
        resolve_quant("w8a8", torch.device("cuda"))
    assert resolve_quant("w8a8", torch.device("cpu")) == "w8a8"


def test_models_and_version_report_w8a8(store, tiny_model_dir):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.tiny import app_settings

    with TestClient(create_app(app_settings(tiny_model_dir, store, model={"quant": "w8a8"}))) as client:
        assert client.get("/v1/models").json()["data"][0]["quantization"] == "w8a8"
        assert client.get("/version").json()["quantization"] == "w8a8"
        from server.kernels import native

        kernel = client.get("/version").json()["quantization_kernel"]  # native where it builds, else fbgemm
        assert kernel == ("native-avx2" if native.load() is not None else "fbgemm")
        body = client.post("/v1/completions", json={"model": "alpha", "prompt": "hello", "max_tokens": 4,
                                                    "temperature": 0}).json()
        assert body["usage"]["completion_tokens"] == 4
