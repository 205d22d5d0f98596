"""The CPU base matmul (oneDNN on an [out, in] weight) computes exactly what GPT-2's Conv1D does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from server.engine import cpu_linear, gpt2
from server.engine.lora_layer import LoRABatchContext, MultiLoRAConv1D

pytestmark = pytest.mark.skipif(not cpu_linear.onednn_available(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN linear")


def _conv(n_in: int = 48, n_out: int = 80) -> Conv1D:
    torch.manual_seed(0)
    conv = Conv1D(n_out, n_in)
    torch.nn.init.normal_(conv.weight, std=0.2)
    torch.nn.init.normal_(conv.bias, std=0.2)
    return conv


def test_transposed_storage_keeps_shape_values_and_state_dict():
    conv = _conv()
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    weight_t = cpu_linear.transpose_storage(conv)
    assert weight_t.shape == (80, 48) and weight_t.is_contiguous()
    assert conv.weight.shape == (48, 80)
    assert conv.weight.data_ptr() == weight_t.data_ptr()  # one copy, not two
    for key, value in conv.state_dict().items():
        assert torch.equal(value, before[key])
    assert cpu_linear.transpose_storage(conv).data_ptr() == weight_t.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 64])
def test_wrapper_base_matmul_equals_conv1d(rows, dtype):
    reference = _conv().to(dtype)
    wrapper = MultiLoRAConv1D(copy.deepcopy(reference), num_slots=2, ctx=LoRABatchContext())
    # oneDNN's bf16 linear needs AVX-512 (or AMX): without it the wrapper keeps the Conv1D path
    assert (wrapper.weight_t is not None) == cpu_linear.onednn_available(torch.device("cpu"), dtype)
    x = torch.randn(2, rows, 48, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        torch.testing.assert_close(wrapper(x), reference(x), rtol=tol, atol=tol)


def test_lm_head_equals_f_linear():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)).eval()
    h = torch.randn(5, 32)
    with torch.inference_mode():
        torch.testing.assert_close(gpt2.lm_head(model, h), F.linear(h, model.lm_head.weight), rtol=1e-5, atol=1e-5)


def test_only_cpu_float32_and_bfloat16():
    cpu = torch.device("cpu")
    assert cpu_linear.onednn_available(cpu, torch.float32)
    # bf16 where this CPU's oneDNN builds the kernel (AVX-512 or AMX; not on every machine CI gets)
    assert cpu_linear.onednn_available(cpu, torch.bfloat16) == cpu_linear._works(torch.bfloat16)
    assert not cpu_linear.onednn_available(cpu, torch.float16)
    assert not cpu_linear.onednn_available(torch.device("cuda"), torch.float32)


def test_a_build_whose_op_fails_falls_back_to_addmm(monkeypatch):
    def broken(*args):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(cpu_linear, "linear", broken)
    cpu_linear._works.cache_clear()
    try:
        assert not cpu_linear.onednn_available(torch.device("cpu"), torch.float32)
        reference = _conv()
        wrapper = MultiLoRAConv1D(copy.deepcopy(reference), num_slots=2, ctx=LoRABatchContext())
        assert wrapper.weight_t is None and wrapper.base.weight.is_contiguous()  # storage left as it was
        x = torch.randn(2, 4, 48)
        with torch.inference_mode():
            torch.testing.assert_close(wrapper(x), reference(x))
    finally:
        cpu_linear._works.cache_clear()
