"""The memory-bandwidth floor of a decode step, measured on this machine in the same run.

A decode step at small batch reads every weight once (and the active LoRA factors, and each
row's cached keys and values) and does little arithmetic per byte, so no implementation can
beat `bytes read per step ÷ memory bandwidth`. Reporting each method's ms/step as a multiple of
that floor says how much is left to gain, which a ratio against HF `generate` cannot.

Bandwidth is measured two ways and the higher counts (the floor is then the harder target):
- a large copy (`dst.copy_(src)`, read + write, buffers far beyond the last-level cache);
- a weight-sized matrix-vector product through the same kernel the engine uses on this device
  (oneDNN's linear on CPU), i.e. the access pattern of a decode step itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# bytes of each buffer: far beyond any last-level cache, small enough to allocate twice anywhere
_COPY_BYTES = 256 * 2**20
_TINY_BYTES = 8 * 2**20


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` calls, in seconds (after one untimed call): the least disturbed
    estimate of what the hardware can do."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: torch.device, nbytes: int = _COPY_BYTES, repeats: int = 5) -> float:
    """Bytes per second moved by a large copy (each byte read once and written once)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / seconds


def matvec_bandwidth(device: torch.device, dtype: torch.dtype, weight_bytes: int, d_in: int = 768,
                     repeats: int = 5) -> float:
    """Bytes per second of weight read by a one-row linear over a weight of `weight_bytes`."""
    from server.engine import cpu_linear

    rows = max(weight_bytes // (d_in * torch.finfo(dtype).bits // 8), 1)
    weight = torch.randn(rows, d_in, device=device).to(dtype)  # [out, in]
    x = torch.randn(1, d_in, device=device).to(dtype)
    if cpu_linear.onednn_available(device, dtype):
        def fn() -> torch.Tensor:
            return cpu_linear.linear(x, weight, None)
    else:
        def fn() -> torch.Tensor:
            return torch.nn.functional.linear(x, weight)
    with torch.inference_mode():
        seconds = _timed(fn, device, repeats)
    return weight.numel() * weight.element_size() / seconds


def measure(device: torch.device, dtype: torch.dtype, weight_bytes: int, d_in: int, tiny: bool = False) -> dict:
    """Both bandwidths (GB/s) and the one the floor uses (the higher)."""
    nbytes = _TINY_BYTES if tiny else _COPY_BYTES
    copy = copy_bandwidth(device, nbytes)
    matvec = matvec_bandwidth(device, dtype, nbytes if tiny else max(weight_bytes, nbytes // 2), d_in)
    return {"copy_gb_s": round(copy / 1e9, 2), "matvec_gb_s": round(matvec / 1e9, 2),
            "gb_s": round(max(copy, matvec) / 1e9, 2),
            "method": "max of a large copy (read+write) and a weight-sized one-row linear"}


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of weights one decode step reads: every block, the final norm and the tied LM head
    (the whole embedding matrix). The embedding lookups read a few rows only and are left out."""
    tr = model.transformer  # type: ignore[attr-defined]
    size = torch.finfo(dtype).bits // 8
    blocks = sum(p.numel() for p in tr.h.parameters()) + sum(p.numel() for p in tr.ln_f.parameters())
    return (blocks + tr.wte.weight.numel()) * size


def int8_weight_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """`weight_bytes` under `--quant int8`: the projections' and the LM head's weights at one
    byte each plus a bf16 scale per output row; biases and norms stay in `dtype`."""
    from transformers.pytorch_utils import Conv1D

    tr = model.transformer  # type: ignore[attr-defined]
    size = torch.finfo(dtype).bits // 8
    total = weight_bytes(model, dtype)
    for m in tr.h.modules():
        if isinstance(m, Conv1D):
            total -= m.weight.numel() * size
            total += m.weight.numel() + m.weight.shape[1] * 2
    total -= tr.wte.weight.numel() * size
    return total + tr.wte.weight.numel() + tr.wte.weight.shape[0] * 2


def kv_bytes(model: torch.nn.Module, dtype: torch.dtype, batch: int, prompt: int, new_tokens: int) -> int:
    """Bytes of cached keys and values read per decode step, averaged over the steps: each row
    reads K and V of every layer for all its positions (prompt + about half the new tokens)."""
    cfg = model.config  # type: ignore[attr-defined]
    size = torch.finfo(dtype).bits // 8
    mean_positions = prompt + new_tokens / 2
    return int(2 * cfg.n_layer * cfg.n_embd * mean_positions * size * batch)


def lora_bytes(tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> int:
    """Bytes of one adapter's A and B factors in the compute dtype."""
    size = torch.finfo(dtype).bits // 8
    return sum((a.numel() + b.numel()) * size for a, b in tensors.values())


def floor_ms(total_bytes: int, bandwidth_gb_s: float) -> float:
    return 1000 * total_bytes / (bandwidth_gb_s * 1e9)
