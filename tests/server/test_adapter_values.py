"""Reading an adapter's factors (`server.store.folder.read_adapter`): the values checks run over
all modules at once and fall back to the exact per-module checks only where the norm bounds do
not clear a module. Both must give the factors a float reference computes from the file, and
the same refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.engine.adapter_weights import BaseSpec
from server.engine.base_model import load_base_model
from server.engine.errors import InvalidAdapter
from server.store.folder import read_adapter
from tests.tiny import make_adapter

FILE = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def specs(tiny_model_dir):
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    return {dt: BaseSpec(resident.module_shapes, resident.fingerprint, 64, dt)
            for dt in (torch.float32, torch.bfloat16, torch.float16)}


def _reference(folder, spec: BaseSpec, scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    raw = load_file(str(folder / FILE))
    out = {}
    for key, a in raw.items():
        if "lora_A" in key:
            b = raw[key.replace("lora_A", "lora_B")]
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = (a.float().t().contiguous().to(spec.dtype), (b.float() * scale).t().contiguous().to(spec.dtype))
    return out


def _edit(folder, fn) -> None:
    raw = load_file(str(folder / FILE))
    save_file({k: fn(k, v) for k, v in raw.items()}, str(folder / FILE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_factors_equal_the_float_reference(tiny_model_dir, tmp_path, specs, dtype):
    folder = make_adapter(tiny_model_dir, tmp_path / "a", seed=3, rank=4, targets=("c_attn", "c_proj", "c_fc"))
    w = read_adapter("a", folder, specs[dtype])
    want = _reference(folder, specs[dtype], w.scale)
    assert set(w.tensors) == set(want)
    for module, (a, b) in w.tensors.items():
        assert a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, want[module][0]) and torch.equal(b, want[module][1]), module


def test_a_module_near_the_bounds_takes_the_exact_checks_and_passes(tiny_model_dir, tmp_path, specs):
    """‖s·B‖ above fp16's largest value, yet every entry of s·B within it and ‖A‖·‖s·B‖ within the
    budget: the fast bounds do not clear it, the exact checks accept it, unchanged."""
    folder = make_adapter(tiny_model_dir, tmp_path / "near", seed=5, rank=4, targets=("c_attn",))
    _edit(folder, lambda k, v: torch.full_like(v, 3000.0) if "lora_B" in k else torch.full_like(v, 1e-5))
    w = read_adapter("near", folder, specs[torch.float16])
    b = next(iter(w.tensors.values()))[1].float()
    assert torch.linalg.vector_norm(b) > torch.finfo(torch.float16).max  # the fast path could not clear it
    want = _reference(folder, specs[torch.float16], w.scale)
    assert all(torch.equal(w.tensors[m][i], want[m][i]) for m in want for i in (0, 1))


@pytest.mark.parametrize("edit,message", [
    (lambda k, v: v.index_put_((torch.tensor([0]), torch.tensor([1])), torch.tensor(float("nan"))) if "h.1.attn.c_attn.lora_A" in k else v,
     "'transformer.h.1.attn.c_attn' holds NaN or infinite"),
    (lambda k, v: v.index_put_((torch.tensor([2]), torch.tensor([0])), torch.tensor(float("-inf"))) if "h.0.attn.c_attn.lora_B" in k else v,
     "'transformer.h.0.attn.c_attn' holds NaN or infinite"),
    (lambda k, v: v * 1e25 if "lora_A" in k else v, "overflow float32 for ordinary activations"),
])
def test_bad_values_are_refused_with_the_module_named(tiny_model_dir, tmp_path, specs, edit, message):
    folder = make_adapter(tiny_model_dir, tmp_path / "bad", seed=6, rank=4, targets=("c_attn",))
    _edit(folder, edit)
    with pytest.raises(InvalidAdapter, match=message):
        read_adapter("bad", folder, specs[torch.float32])


def test_a_negative_scale_is_bounded_by_its_magnitude(tiny_model_dir, tmp_path, specs):
    """lora_alpha < 0 makes the scale negative: s·B must still fit fp16 in magnitude."""
    folder = make_adapter(tiny_model_dir, tmp_path / "neg", seed=7, rank=4, targets=("c_attn",), scale_b=1e6)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["lora_alpha"] = -cfg["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    assert read_adapter("neg", folder, specs[torch.float32]).scale < 0
    with pytest.raises(InvalidAdapter, match="overflow"):
        read_adapter("neg", folder, specs[torch.float16])


def test_factors_of_mixed_dtypes_in_one_file_equal_the_float_reference(tiny_model_dir, tmp_path, specs):
    """Factors are read into one stack per side, dtype and shape: a file mixing fp32, bf16, fp16 and
    fp64 factors splits into several, and each module still gets its own values."""
    folder = make_adapter(tiny_model_dir, tmp_path / "mixed", seed=8, rank=4, targets=("c_attn", "c_proj", "c_fc"))
    kinds = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    _edit(folder, lambda k, v: v.to(kinds[(len(k) + ("lora_B" in k)) % 4]))
    assert len({t.dtype for t in load_file(str(folder / FILE)).values()}) > 2
    for dtype in (torch.float32, torch.bfloat16):
        w = read_adapter("mixed", folder, specs[dtype])
        want = _reference(folder, specs[dtype], w.scale)
        assert set(w.tensors) == set(want)
        assert all(torch.equal(w.tensors[m][i], want[m][i]) for m in want for i in (0, 1))


def test_integer_factors_are_refused_at_registration(tiny_model_dir, tmp_path, specs):
    folder = make_adapter(tiny_model_dir, tmp_path / "int", seed=9, rank=4, targets=("c_attn",))
    _edit(folder, lambda k, v: v.to(torch.int32) if "h.0.attn.c_attn.lora_B" in k else v)
    with pytest.raises(InvalidAdapter, match="'transformer.h.0.attn.c_attn': LoRA weights must be floating point"):
        read_adapter("int", folder, specs[torch.float32])


def test_stacks_of_odd_byte_sizes_do_not_misalign_the_next(tmp_path):
    """Factors are read into stacks of one buffer: an fp16 stack of 3 values (6 bytes) must not
    leave the fp32 and fp64 stacks after it at offsets their dtypes cannot be viewed at."""
    spec = BaseSpec({"m.a": (3, 5), "m.b": (5, 3)}, "fp", 4)
    g = torch.Generator().manual_seed(11)
    factors = {"m.a": (torch.randn(1, 3, generator=g).half(), torch.randn(5, 1, generator=g)),
               "m.b": (torch.randn(1, 5, generator=g).double(), torch.randn(3, 1, generator=g).half())}
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2}))
    save_file({f"base_model.model.{m}.lora_{ab}.weight": t for m, pair in factors.items() for ab, t in zip("AB", pair, strict=True)},
              folder / FILE)
    w = read_adapter("odd", folder, spec)
    for m, (a, b) in factors.items():
        assert torch.equal(w.tensors[m][0], a.float().t()) and torch.equal(w.tensors[m][1], (b.float() * 2.0).t()), m
