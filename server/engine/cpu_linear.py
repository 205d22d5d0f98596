"""The CPU matmul the engine's projections use: oneDNN's linear on an `[out, in]` weight.

Why: on CPU, torch's `addmm` goes to MKL, whose sgemm repacks the whole weight on every call.
At decode shapes (a handful of rows against a 768 x 2304 weight) that packing is most of the
work; oneDNN's linear (the op `torch.compile` emits on CPU) does not pay it. Measured on this
project's 2-core AMD EPYC with GPT-2 124M's twelve blocks: 45 -> 22 ms at 8 rows, 20 -> 14 ms
at one row, and the tied LM head 26 -> 10 ms at 8 rows (`python -m bench.profile_engine`).

oneDNN wants the weight as a contiguous `[out, in]` matrix; GPT-2's `Conv1D` stores `[in, out]`.
Rather than keep two copies, `transpose_storage` moves the values into `[out, in]` storage and
leaves the Conv1D holding an `[in, out]` view of it: same shape, same values, same state_dict.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _DTYPES and _works(dtype)


@functools.cache
def _works(dtype: torch.dtype) -> bool:
    """The op is private to torch (inductor emits it), so check once per dtype that this build
    has it, with this signature, and that it agrees with F.linear; otherwise fall back."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=gen).to(dtype) for shape in ((3, 16), (5, 16), (5,)))
    try:
        with torch.inference_mode():
            out = linear(x, w, b)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return torch.allclose(out.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX) and oneDNN's bf16 linear
    works here: then bf16 halves the bytes a decode step streams (the step is memory-bound) at no
    extra arithmetic cost. Without those instructions bf16 is emulated and slower than fp32."""
    try:
        caps = torch.cpu.get_capabilities()  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16")) and _works(torch.bfloat16)


def linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, in] @ weight_t[out, in].T + bias -> [N, out], through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight_t, bias, "none", [], "")


def transpose_storage(conv: nn.Module) -> torch.Tensor:
    """Store a Conv1D's weight as contiguous [out, in]; returns that tensor. Idempotent."""
    weight = conv.weight  # [in, out]
    assert isinstance(weight, torch.Tensor)
    weight_t = weight.detach().t()  # [out, in]
    if not weight_t.is_contiguous():
        weight_t = weight_t.contiguous()
        conv.weight = nn.Parameter(weight_t.t(), requires_grad=weight.requires_grad)  # [in, out] view
    return weight_t
