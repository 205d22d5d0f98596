"""`--dtype auto` on CUDA: bf16 from compute capability 8.0 (Ampere, Hopper), fp16 below, decided
from the device's capability; checked here with the capability faked (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from server.engine import base_model
from server.engine.base_model import cuda_auto_dtype, resolve_dtype
from server.engine.errors import ModelLoadError


@pytest.mark.parametrize(("capability", "expected"), [
    ((6, 1), torch.float16),  # Pascal
    ((7, 0), torch.float16),  # V100
    ((7, 5), torch.float16),  # T4
    ((8, 0), torch.bfloat16),  # A100
    ((8, 6), torch.bfloat16),  # A10, RTX 30xx
    ((8, 9), torch.bfloat16),  # L4, RTX 40xx
    ((9, 0), torch.bfloat16),  # H100, H200
    ((10, 0), torch.bfloat16),  # B200
    ((12, 0), torch.bfloat16),
])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    asked: list[torch.device] = []

    def fake(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", fake)
    assert cuda_auto_dtype(capability) == expected
    assert resolve_dtype("auto", torch.device("cuda", 1)) == expected
    assert asked == [torch.device("cuda", 1)]  # the serving device's own capability, not device 0's


def test_explicit_dtypes_and_cpu_ignore_the_gpu(monkeypatch):
    def no_gpu(device=None):
        raise AssertionError("a CPU server or an explicit dtype never asks the GPU")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    for name, dtype in base_model.DTYPES.items():
        assert resolve_dtype(name, torch.device("cuda")) == dtype
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.bfloat16, torch.float32)
    with pytest.raises(ModelLoadError):
        resolve_dtype("float8", torch.device("cuda"))
