"""Weight-only int8 base weights (`--quant int8`): the projections and the tied LM head.

Why: a decode step at batch 1–8 is memory-bound — it streams every weight once per step — so
reading one byte per weight instead of four (fp32) or two (bf16) is the way past any 16-bit
engine. Weights are quantised symmetrically per output channel (`w ≈ q · s`, `q` int8 in
[-127, 127], one scale per output row), the scheme of LLM.int8()'s vector-wise quantisation
without its outlier split (arXiv:2208.07339) and of gpt-fast's `WeightOnlyInt8Linear`.
Activations stay float: only the weights are quantised.

Two kernels. On CPU, where a C++ compiler is found, the native one (`server/kernels/`,
loaded by the caller and passed in): int8 weights widened to fp32 in registers against fp32
activations, AVX2, packed so a block of outputs is one sequential read; at one row it runs near
memory speed, and it takes every row count (prefill included). Elsewhere torch's
`_weight_int8pack_mm` (the op gpt-fast's int8 path and inductor's CPU int8 weight-only pattern
lower to), measured against oneDNN fp32 and torchao's eager int8 weight-only in
docs/performance.md. Its fast CPU path wants bf16 activations and bf16 scales (with fp32
activations it is 8–28× slower), so the input is rounded to bf16 for the call and the output
converted back; the scales are rounded to bf16 before the weights are divided by them, so
`q · s` is the exact dequantised weight (for both kernels). It is a matrix-vector product at
heart: above `max_rows` rows (prefill, prompt logprobs) it loses to a dense matmul, so those
calls dequantise the weight and take the float path.

LoRA factors and the mixture stay float: `MultiLoRAConv1D` adds its delta to this output
as it does to the float base's. The float weights stay resident (the adapter fingerprint, the
router's embedder, a float reload), so `--quant int8` adds a quarter to the weights' memory;
a step reads only the int8 copy.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from server.kernels.native import NativeInt8

QUANTS = ("none", "int8", "w8a8")
# the int8 base weights a projection can carry: weight-only (`Int8Linear`) or with int8
# activations too (`W8A8Linear`); one attribute name (`MultiLoRAConv1D.int8`) holds either
Int8Kind = Union["Int8Linear", "W8A8Linear"]


@functools.cache
def int8pack_works(device_type: str) -> bool:
    """Whether `_weight_int8pack_mm` exists here and agrees with a float reference (checked
    once per device type; the op is private to torch)."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, generator=gen)
    x = torch.randn(3, 32, generator=gen)
    try:
        q, s = quantize_per_channel(w)
        with torch.inference_mode():
            out = torch.ops.aten._weight_int8pack_mm(x.to(device_type, torch.bfloat16), q.to(device_type),
                                                     s.to(device_type)).float().cpu()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    ref = x @ (q.float() * s.float()[:, None]).t()
    return bool(torch.allclose(out, ref, rtol=2e-2, atol=2e-2))


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [out, in] float -> (q [out, in] int8, scales [out] bf16), `weight ≈ q · scales`.

    Symmetric, one scale per output row: amax / 127, rounded to bf16 first (the kernel reads
    bf16 scales) so the weight is divided by the scale the kernel multiplies by."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    scales = (amax / 127).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


class Int8Linear(nn.Module):
    """`x [N, in] -> x Wᵀ + b` [N, out] with W held as int8 + per-row scales.

    Two kernels: on CPU the native one (`server/kernels/int8_gemv.cpp`, passed in as `native`:
    fp32 activations, weights widened in registers, at memory speed from one row; the weight is
    kept in its packed layout) where it loaded, else torch's `_weight_int8pack_mm`.

    Holds no parameter and only non-persistent buffers, so attaching it to a model changes
    neither its `state_dict` nor its fingerprint. `bias` is the float module's own tensor (the
    native kernel keeps an fp32 copy)."""

    # above this many rows dequantising the weight for a dense matmul is faster than torch's
    # kernel (measured per projection shape on a quiet 2-core AVX2 EPYC: it wins up to ~100 rows
    # for c_fc, ~150 for c_attn, past 256 for the mlp c_proj). The native kernel takes every row
    # count: dequantising per call costs more than it saves at every size measured (16–128 rows,
    # the LM head 49 ms against 355 at 64 rows: docs/performance.md)
    max_rows = 96
    qweight: torch.Tensor  # [out, in] int8 (the native kernel's packed layout when `native`)
    scales: torch.Tensor  # [out] bf16 (fp32 when `native`; the same values)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 native: NativeInt8 | None = None) -> None:  # weight [out, in]
        super().__init__()
        q, scales = quantize_per_channel(weight)
        usable = native is not None and weight.device.type == "cpu" and q.shape[1] % 8 == 0
        self.native = native if usable else None
        if self.native is not None:
            q, scales = self.native.pack(q), scales.float()
        self.register_buffer("qweight", q.to(weight.device), persistent=False)
        self.register_buffer("scales", scales.to(weight.device), persistent=False)
        self.bias = None if bias is None else bias.detach()  # the float module's storage, not a parameter here
        self.bias32 = None if bias is None or self.native is None else bias.detach().float().contiguous()
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.kernel = self.native is None and int8pack_works(weight.device.type)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:  # [out, in]
        q = self.qweight if self.native is None else self.native.unpack(self.qweight)
        return (q.to(dtype) * self.scales.to(dtype)[:, None]).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, in] -> [N, out], x's dtype
        if self.native is not None:
            return self.native.linear(x, self.qweight, self.scales, self.bias32)
        if self.kernel and x.shape[0] <= self.max_rows:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales)  # bf16
            if self.bias is None or self.bias.dtype != x.dtype:
                y = y.to(x.dtype)
                return y if self.bias is None else y.add_(self.bias)
            return torch.add(self.bias, y)  # promotes to the bias' (= x's) dtype: one op, not two
        return F.linear(x, self.dequantized(x.dtype), self.bias)


def quantize_model(model: nn.Module, layers: Iterable[nn.Module], kind: str = "int8",
                   native: NativeInt8 | None = None) -> int:
    """Attach `Int8Linear`s (`kind` "int8", through the `native` kernel where given) or
    `W8A8Linear`s ("w8a8") to the wrapped projections (`MultiLoRAConv1D.int8`, `layers`) and to
    the tied LM head (`model.lm_head_int8`, read by `gpt2.lm_head`); returns how many were made.
    Idempotent: a projection or head that already has one keeps it."""

    if kind not in ("int8", "w8a8"):
        raise ValueError(f"unknown int8 kind {kind!r}")

    def make(weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Kind:
        return Int8Linear(weight, bias, native) if kind == "int8" else W8A8Linear(weight, bias, native)

    made = 0
    for layer in layers:
        if getattr(layer, "int8", None) is None:
            base: Any = layer.base  # a transformers Conv1D: weight [in, out]
            layer.int8 = make(base.weight.detach().t(), base.bias)
            made += 1
    if getattr(model, "lm_head_int8", None) is None:
        head: Any = model.get_output_embeddings()  # type: ignore[operator]
        model.lm_head_int8 = make(head.weight.detach(), head.bias)
        made += 1
    return made


def kernel_name(model: nn.Module) -> str:
    """Which kernel reads the model's int8 weights (reported by `/version`): `native-avx2`,
    `torch-int8pack`, `fbgemm`, `dequantised` (a float matmul per call), or ``."""
    head = getattr(model, "lm_head_int8", None)
    if isinstance(head, (W8A8Linear, Int8Linear)) and head.native is not None:
        return "native-avx2"
    if isinstance(head, W8A8Linear):
        return "fbgemm"
    if isinstance(head, Int8Linear):
        return "torch-int8pack" if head.kernel else "dequantised"
    return ""


# Columns appended to every normalised activation row: +1, -1, then zeros (weights 0 there).
# Every row then holds both ends of [-1, 1], so the kernel's per-tensor range is [-1, 1]
# whatever else is in the batch, and each row's quantisation is its own.
_MARKS = 8


@functools.cache
def w8a8_works(device_type: str) -> bool:
    """Whether fbgemm's dynamically quantised int8 linear runs here and agrees with a float
    reference (a CPU kernel: False on CUDA; checked once per device type)."""
    if device_type != "cpu" or not hasattr(torch.ops.quantized, "linear_dynamic"):
        return False
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 32, generator=gen), torch.randn(3, 32, generator=gen)
    try:
        with torch.inference_mode():
            out = W8A8Linear(w, None)(x)
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return False
    ref = x @ w.t()
    return bool((out - ref).norm() <= 0.05 * ref.norm())


class W8A8Linear(nn.Module):
    """`x [N, in] -> x Wᵀ + b` [N, out] with W as int8 + per-row scales and x quantised to int8
    on the fly, per row (`--quant w8a8`).

    Why: the weight-only kernel (`Int8Linear`) multiplies in bf16 and, without AVX-512, has no
    fast path: at 8 rows it is slower than fp32. fbgemm's int8 GEMM (PyTorch's dynamic
    quantisation kernel, AVX2 and AVX-512) multiplies int8 by int8 into int32, so a step reads one
    byte per weight at every batch size; measured per projection in docs/performance.md. This is
    the scheme of llama.cpp's q8_0 matmuls (activations quantised to int8 next to int8 weights).

    The kernel quantises its input with one scale for the whole tensor, which would make a row's
    result depend on the other rows in its batch. So each row is first divided by its own largest
    magnitude (into [-1, 1]), `_MARKS` columns holding +1 and -1 pin the tensor's range to exactly
    [-1, 1], and the output row is multiplied back: a row's numerics are its own, alone or
    batched. Activations are rounded to 7 bits per side (`reduce_range`, which keeps AVX2's
    16-bit pairwise sums from saturating): ~1.5-2 % relative error per projection on Gaussian
    inputs, against ~0.8 % weight-only; `int8` stays for the tighter numerics.

    With the native kernel (`native`, `server/kernels/int8_gemv.cpp`) the same scheme runs in one
    call without the marks: each row is quantised to 7 bits on its own scale inside the kernel
    and its int32 dot products are exact, so a row is its own by construction; at one row it
    is about twice as fast as fbgemm here (docs/performance.md). fbgemm stays the fallback."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 native: NativeInt8 | None = None) -> None:  # weight [out, in]
        super().__init__()
        q, scales = quantize_per_channel(weight.cpu())
        out_f, in_f = q.shape
        self.bias = None if bias is None else bias.detach().float()  # the kernel's output is fp32
        self.in_features, self.out_features = in_f, out_f
        self.native = native if native is not None and in_f % 32 == 0 else None
        if self.native is not None:
            self.qweight, self.scales = self.native.pack_w8a8(q), scales.float()  # the only copy kept
            return
        q = torch.cat([q, q.new_zeros(out_f, _MARKS)], dim=1)  # weights of the mark columns: 0
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch; fbgemm's packing still takes one
            warnings.simplefilter("ignore")
            qt = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros(out_f, dtype=torch.long), 0)
            # fbgemm's packed int8 weight, the only copy kept (`linear_unpack` gives it back)
            self.packed = torch.ops.quantized.linear_prepack(qt, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, in] -> [N, out], x's dtype
        if self.native is not None:
            return self.native.linear_w8a8(x, self.qweight, self.scales, self.bias)
        # five ops around the kernel (each ~4-12 µs at one row; at batch 1 they were ~10 % of a
        # step): fewer than a preallocated buffer filled in place, measured. abs().amax() is the
        # same maximum as vector_norm(inf) (NaN and inf included) at 7 µs instead of 12-16 at
        # one row, 12 instead of 33 at eight
        xf = x if x.dtype == torch.float32 else x.float()
        amax = xf.abs().amax(1, keepdim=True).clamp_(min=1e-30)  # [N, 1]
        n = xf.shape[0]
        marks = _cached_marks(n, xf.device) if n <= 64 else _marks(n, xf.device)  # decode steps: cached
        xn = torch.cat([xf / amax, marks], dim=1)  # [N, in + marks], every row in [-1, 1] and spanning it
        y = _linear_dynamic(xn, self.packed, True)  # [N, out] fp32, for the unit rows
        y = y.mul_(amax) if self.bias is None else torch.addcmul(self.bias, y, amax)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def _marks(rows: int, device: torch.device) -> torch.Tensor:  # [rows, _MARKS] fp32: +1, -1, 0...
    with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
        marks = torch.zeros(rows, _MARKS, device=device)
        marks[:, 0], marks[:, 1] = 1.0, -1.0
    return marks


_cached_marks = functools.lru_cache(maxsize=64)(_marks)  # never written to: shared by every call


def _linear_dynamic(x: torch.Tensor, packed: Any, reduce_range: bool) -> torch.Tensor:
    """fbgemm's dynamic int8 linear, called through the OpOverload's own C++ function: the
    packet's `__call__` first searches the arguments for fake script objects (~7 µs a call), and
    so does the overload's (~4 µs; a tracer's business, and `--quant w8a8` is eager only)."""
    return _linear_dynamic_op()(x, packed, reduce_range)


@functools.cache
def _linear_dynamic_op() -> Any:  # looked up on first use: builds without fbgemm lack the op
    overload = torch.ops.quantized.linear_dynamic.default
    return getattr(overload, "_op", overload)
