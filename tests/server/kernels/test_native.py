"""The native int8 kernel (`server/kernels/int8_gemv.cpp`) against a float reference.

Tolerance, stated: the kernel multiplies the exact int8 weights and fp32 scales by fp32
activations in fp32, so against a float64 product of the same dequantised weights its error is
fp32 accumulation over `in` terms (~1e-6 relative); the tests demand 1e-5. Against the original
float weights the error is the int8 rounding (`test_quant_int8`'s ≤ 2 %). The w8a8 kernel rounds
each activation row to 7 bits on its own scale (a step of 1/63 of the row's largest magnitude):
≈ 1.5–2 % on Gaussian inputs, demanded ≤ 4 % per row as for fbgemm's path (`test_quant_w8a8`).
A row's result is bitwise the same alone, in any batch, in any order and on any thread count:
each (row, output) pair is summed in one fixed order (w8a8: exact int32 sums).
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from server.engine.quant import Int8Linear, W8A8Linear, quantize_per_channel
from server.kernels import native

KERNEL = native.load()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="the native kernel did not build here (no C++ compiler, "
                                "or a CPU without AVX2; the log says which)")


def _reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ (q.double() * s.double()[:, None]).t()
    return y if b is None else y + b.double()


def _case(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return q, torch.rand(n, generator=gen) / 50, torch.randn(n, generator=gen)


@pytest.mark.parametrize("n,k", [(8, 8), (21, 48), (96, 64), (2304 // 8, 768 // 4), (101, 256)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("bias", [True, False])
def test_products_match_a_float64_reference(n, k, rows, bias):
    q, s, b = _case(n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
    got = KERNEL.linear(x, KERNEL.pack(q), s, b if bias else None)
    ref = _reference(x, q, s, b if bias else None)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-5


def test_pack_and_unpack_round_trip():
    for n in (8, 13, 64, 67):
        q, _, _ = _case(n, 40, seed=n)
        packed = KERNEL.pack(q)
        assert packed.shape == q.shape and packed.dtype == torch.int8
        assert torch.equal(KERNEL.unpack(packed), q)
        assert n < 16 or not torch.equal(packed, q)  # a real re-layout, not a copy


def test_a_row_is_the_same_alone_in_any_batch_order_and_thread_count():
    q, s, b = _case(77, 96)
    packed = KERNEL.pack(q)
    x = torch.randn(9, 96) * torch.logspace(-3, 3, 9)[:, None]
    threads = torch.get_num_threads()
    try:
        batched = KERNEL.linear(x, packed, s, b)
        for m in range(1, 10):  # every batch size the kernel blocks differently (1, 2, 3, 4+)
            part = KERNEL.linear(x[:m], packed, s, b)
            assert torch.equal(part, batched[:m]), m
        alone = torch.cat([KERNEL.linear(x[i:i + 1], packed, s, b) for i in range(9)])
        assert torch.equal(alone, batched)
        assert torch.equal(KERNEL.linear(x.flip(0), packed, s, b).flip(0), batched)
        torch.set_num_threads(1)
        assert torch.equal(KERNEL.linear(x, packed, s, b), batched)
    finally:
        torch.set_num_threads(threads)


def test_strided_rows_and_a_non_finite_row_stay_in_their_rows():
    q, s, b = _case(40, 64)
    packed = KERNEL.pack(q)
    wide = torch.randn(5, 100)
    x = wide[:, 10:74]  # rows 100 floats apart, unit column stride
    assert not x.is_contiguous()
    assert torch.equal(KERNEL.linear(x, packed, s, b), KERNEL.linear(x.contiguous(), packed, s, b))
    x = x.contiguous()
    x[2, 5] = float("nan")
    got = KERNEL.linear(x, packed, s, b)
    assert bool(got[2].isnan().all()) and bool(torch.isfinite(got[[0, 1, 3, 4]]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_uses_the_native_kernel_and_matches_the_float_weights(dtype):
    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(96, 64, generator=gen) * 0.05, torch.randn(96, generator=gen) * 0.1
    lin = Int8Linear(w, b.to(dtype), KERNEL)
    assert lin.native is KERNEL and not lin.kernel  # torch's kernel is not used beside it
    q, scales = quantize_per_channel(w)
    assert torch.equal(lin.dequantized(torch.float32), q.float() * scales.float()[:, None])
    for rows in (1, 8, Int8Linear.max_rows + 8):  # past torch's kernel's limit the native one still runs
        x = torch.randn(rows, 64, generator=gen).to(dtype)
        with torch.inference_mode():
            got = lin(x)
            direct = KERNEL.linear(x.float(), lin.qweight, lin.scales, lin.bias32)
        assert got.dtype == dtype and got.shape == (rows, 96)
        assert torch.equal(got, direct.to(dtype))
        ref = x.float() @ w.t() + b.to(dtype).float()
        assert float((got.float() - ref).norm() / ref.norm()) < 0.02
    odd = Int8Linear(torch.randn(16, 12), None, KERNEL)  # in % 8 != 0: torch's kernel
    assert odd.native is None


def test_off_switch_missing_compiler_and_failed_build_fall_back_with_a_reason(monkeypatch, caplog, tmp_path):
    try:
        native.load.cache_clear()
        monkeypatch.setenv("SWITCHBOARD_NATIVE_KERNELS", "0")
        assert native.load() is None
        monkeypatch.delenv("SWITCHBOARD_NATIVE_KERNELS")
        native.load.cache_clear()
        monkeypatch.setenv("CXX", "/nonexistent/g++")
        with caplog.at_level(logging.WARNING, logger="server.kernels.native"):
            assert native.load() is None
        assert "native int8 kernel unavailable" in caplog.text
        native.load.cache_clear()
        caplog.clear()
        monkeypatch.setenv("CXX", shutil.which("false") or "false")  # a compiler that fails every build
        monkeypatch.setenv("SWITCHBOARD_KERNEL_DIR", str(tmp_path))
        with caplog.at_level(logging.WARNING, logger="server.kernels.native"):
            assert native.load() is None
        assert "failed" in caplog.text and not list(tmp_path.iterdir())  # nothing half-built left behind
    finally:
        native.load.cache_clear()


def test_builds_into_its_own_folder_atomically(monkeypatch, tmp_path):
    try:
        native.load.cache_clear()
        monkeypatch.setenv("SWITCHBOARD_KERNEL_DIR", str(tmp_path / "k"))
        kernel = native.load()
        assert kernel is not None and kernel.path.parent == tmp_path / "k"
        assert [p.name for p in (tmp_path / "k").iterdir()] == [kernel.path.name]  # no temporary left
        native.load.cache_clear()
        again = native.load()  # a second process finds the built file and does not rebuild it
        assert again is not None and again.path == kernel.path
    finally:
        native.load.cache_clear()


@pytest.mark.parametrize("n,k", [(8, 32), (21, 64), (96, 64), (101, 256)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
def test_w8a8_products_match_the_float_reference_row_by_row(n, k, rows):
    q, s, b = _case(n, k, seed=n + rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * torch.logspace(-3, 2, rows)[:, None]
    got = KERNEL.linear_w8a8(x, KERNEL.pack_w8a8(q), s, b)
    ref = _reference(x, q, s, b)
    for i in range(rows):  # each row within the tolerance of its own size: its own scale
        assert float((got[i].double() - ref[i]).norm() / ref[i].norm()) < 0.04, i
    # the int32 dot products are exact: a row quantised by hand gives the same sums
    xq = torch.round(x * (63 / x.abs().amax(1, keepdim=True))).clamp(-63, 63)
    exact = (xq.double() @ q.double().t()) * (x.abs().amax(1, keepdim=True).double() / 63) * s.double() + b.double()
    assert torch.allclose(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_w8a8_rows_are_their_own_and_a_bad_row_stays_in_its_row():
    q, s, b = _case(77, 96)
    packed = KERNEL.pack_w8a8(q)
    x = torch.randn(9, 96) * torch.logspace(-3, 3, 9)[:, None]
    x[4] = 0.0  # a row of zeros: the bias alone
    batched = KERNEL.linear_w8a8(x, packed, s, b)
    assert torch.equal(torch.cat([KERNEL.linear_w8a8(x[i:i + 1], packed, s, b) for i in range(9)]), batched)
    assert torch.equal(KERNEL.linear_w8a8(x.flip(0), packed, s, b).flip(0), batched)
    assert torch.equal(batched[4], b)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[2, 7] = bad
        got = KERNEL.linear_w8a8(y, packed, s, b)
        assert bool(got[2].isnan().all()) and torch.equal(got[[0, 1, 3, 4, 5, 6, 7, 8]], batched[[0, 1, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_uses_the_native_kernel(dtype):
    gen = torch.Generator().manual_seed(5)
    w, b = torch.randn(96, 64, generator=gen) * 0.05, torch.randn(96, generator=gen) * 0.1
    lin, fb = W8A8Linear(w, b.to(dtype), KERNEL), W8A8Linear(w, b.to(dtype))
    assert lin.native is KERNEL and not hasattr(lin, "packed") and fb.native is None
    x = torch.randn(40, 64, generator=gen).to(dtype)
    with torch.inference_mode():
        got, theirs = lin(x), fb(x)
    assert got.dtype == dtype and got.shape == (40, 96)
    ref = x.float() @ w.t() + b.to(dtype).float()
    assert float((got.float() - ref).norm() / ref.norm()) < 0.04
    assert float((got.float() - theirs.float()).norm() / ref.norm()) < 0.04  # the same scheme as fbgemm's path
    assert W8A8Linear(torch.randn(16, 48), None, KERNEL).native is None  # in % 32 != 0: fbgemm


@pytest.mark.parametrize("quant", ["int8", "w8a8"])
def test_quantised_engine_rows_equal_rows_run_alone(store, tiny_model_dir, quant):
    """The whole quantised step, not just its products: rows of different lengths, adapters and
    mixtures give the same tokens and log-probs batched as alone (rows leave the batch mid-way)."""
    from server.engine.quant import kernel_name
    from tests.server.engine.rows import PROMPT, alone_and_batched, tiny_engine

    engine = tiny_engine(store, tiny_model_dir, quant=quant)
    assert kernel_name(engine.resident.model) == "native-avx2"
    specs = [(PROMPT, {"alpha": 1.0}, 10), (PROMPT[:4], {"beta": 1.0}, 3), ([7, 7, 7, 7, 7], {}, 7),
             ([1, 2, 3], {"alpha": 0.5, "beta": 0.5}, 12)]
    alone, alone_lp, together, together_lp = alone_and_batched(engine, specs)
    assert together == alone and [len(t) for t in alone] == [n for _, _, n in specs]
    for got, ref in zip(together_lp, alone_lp, strict=True):
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


@pytest.mark.parametrize("rank,out", [(64, 2304), (64, 768), (16, 70), (11, 64), (3, 130)])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_lora_products_match_float64_and_keep_rows_their_own(rank, out, rows):
    """The LoRA layer's two products under `--quant` (h = x Aᵀ, then y += h B) against float64,
    with rank and width tails (R % 8, N % 64), and each row bitwise the same alone."""
    gen = torch.Generator().manual_seed(rank + out + rows)
    a_t, b = torch.randn(rank, 96, generator=gen) * 0.1, torch.randn(rank, out, generator=gen) * 0.1
    x, y0 = torch.randn(rows, 96, generator=gen), torch.randn(rows, out, generator=gen)
    h = KERNEL.lora_down(x, a_t)
    y = KERNEL.lora_up_(y0.clone(), h, b)
    ref_h = x.double() @ a_t.double().t()
    assert float((h.double() - ref_h).norm() / ref_h.norm()) < 1e-5
    ref_y = y0.double() + h.double() @ b.double()
    assert float((y.double() - ref_y).norm() / ref_y.norm()) < 1e-5
    for i in range(rows):
        alone_h = KERNEL.lora_down(x[i:i + 1], a_t)
        assert torch.equal(alone_h, h[i:i + 1])
        assert torch.equal(KERNEL.lora_up_(y0[i:i + 1].clone(), alone_h, b), y[i:i + 1])


def test_the_lora_layer_takes_the_native_products_only_under_quant(store, tiny_model_dir, monkeypatch):
    """Under `--quant int8` a decode step's low-rank products run on the native kernels; the float
    engine never calls them (its numerics stay PEFT's)."""
    from tests.server.engine.rows import PROMPT, hold, row, tiny_engine
    from tests.tiny import run_engine

    calls: list[str] = []
    for name in ("lora_down", "lora_up_"):
        real = getattr(native.NativeInt8, name)
        monkeypatch.setattr(native.NativeInt8, name,
                            lambda self, *a, _real=real, _name=name: calls.append(_name) or _real(self, *a))
    for quant, expect in (("none", False), ("int8", True)):
        calls.clear()
        engine = tiny_engine(store, tiny_model_dir, quant=quant)
        seq = hold(engine, row(PROMPT, {"alpha": 0.5, "beta": 0.5}, max_tokens=3))
        assert len(run_engine(engine, [seq])[seq.id]) >= 3
        assert bool(calls) is expect and (not expect or {"lora_down", "lora_up_"} <= set(calls)), quant
