"""Loading the one resident GPT-2 (hub id or local folder) and describing it for validation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from router_core import store_rules
from router_core.store_rules import StoreRuleError, base_fingerprint
from server.engine import cpu_linear, quant
from server.engine.errors import ModelLoadError

if TYPE_CHECKING:
    from server.kernels.native import NativeInt8

log = logging.getLogger(__name__)

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    try:
        return store_rules.resolve_device(name)
    except StoreRuleError as e:
        raise ModelLoadError(str(e)) from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: on CUDA, bf16 on compute capability 8.0 and newer (Ampere, Hopper, ...), fp16
    below (`cuda_auto_dtype`); on CPU bf16 where the CPU computes it natively (decode streams half
    the bytes, see `cpu_linear.native_bf16`), fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return cuda_auto_dtype(torch.cuda.get_device_capability(device))
        return torch.bfloat16 if device.type == "cpu" and cpu_linear.native_bf16() else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}") from None


def cuda_auto_dtype(capability: tuple[int, int]) -> torch.dtype:
    """`--dtype auto` on a CUDA device of this compute capability. bf16 from sm80 on: it has fp32's
    exponent range, so an activation or a LoRA product that would pass fp16's 65504 stays finite
    (fp16 turns it into inf, and that row fails), and sm80+ tensor cores run bf16 at fp16's
    speed, so nothing is paid for it; its 8-bit mantissa is the cost, held to the same PEFT
    parity bound as on CPU (`test_engine_bf16.py`, `scripts/gpu_check.sh`). Below sm80 bf16 is
    emulated or absent: fp16, with the overflow guards (registration bound on factor norms,
    masked gating, non-finite logits fail their row alone)."""
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def resolve_quant(name: str, device: torch.device) -> str:
    """`auto` is `none`: int8 base weights are not PEFT-exact (parity holds in the float modes),
    and on the AVX2 CPU this was measured on the int8 kernel gained too little over the float
    step to change numerics by default (docs/performance.md). `int8` is opted into."""
    if name == "auto":
        return "none"
    if name not in quant.QUANTS:
        raise ModelLoadError(f"unknown quantisation {name!r}; choose auto, {', '.join(quant.QUANTS)}")
    if name == "w8a8" and not quant.w8a8_works(device.type) and int8_kernel(name, device) is None:
        raise ModelLoadError(f"--quant w8a8 needs fbgemm's int8 GEMM, a CPU kernel this build lacks on {device}; "
                             "use --quant int8 (weight-only) or none")
    if name == "int8" and not quant.int8pack_works(device.type) and int8_kernel(name, device) is None:
        log.warning("--quant int8: torch's int8 kernel is unavailable on %s; the int8 weights are "
                    "dequantised per call (correct, not faster)", device)
    return name


def int8_kernel(quant_name: str, device: torch.device) -> NativeInt8 | None:
    """The native int8 kernel `--quant int8` and `w8a8` use on CPU (compiled on first use into a
    cache folder: server/kernels/native.py), or None where it is not built (no quantisation,
    CUDA, no compiler; then torch's kernel or fbgemm)."""
    if quant_name not in ("int8", "w8a8") or device.type != "cpu":
        return None
    from server.kernels import native

    return native.load()


def targetable_modules(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) of every Conv1D an adapter may target."""
    return {
        path: (m.weight.shape[0], m.weight.shape[1])
        for path, m in model.named_modules()
        if isinstance(m, Conv1D) and path.rsplit(".", 1)[-1] in LORA_TARGETS
    }


@dataclass
class ResidentModel:
    model_id: str
    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    module_shapes: dict[str, tuple[int, int]]
    source: str = ""  # what --base-model said (hub id or folder), for messages that quote a command
    quant: str = "none"  # "int8"/"w8a8": the engine reads int8 copies of the base weights (`quant.py`)
    quant_kernel: str = ""  # which kernel reads them (`quant.kernel_name`), set when the engine quantises

    @property
    def max_positions(self) -> int:
        return int(self.model.config.n_positions)


HOW_TO_SUPPLY = (
    "Supply the weights one of two ways: (1) put the model in the Hugging Face cache on a machine "
    "with network access (`hf download {name}`, then copy ~/.cache/huggingface or set HF_HOME), or "
    "(2) pass --base-model /path/to/folder holding config.json, model.safetensors and the tokenizer "
    "files (e.g. made with `save_pretrained`).")


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """One TCP connection to the hub, so a machine without network gets its clear message at once
    instead of the hub client's retries (48 log lines, each twice, before the same error)."""
    import os
    import socket

    endpoint = os.environ.get("HF_ENDPOINT", "")
    if endpoint:
        host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0] or host
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_options(name_or_path: str) -> dict:
    """`local_files_only` when the model is a folder or already in the cache; a ModelLoadError at
    once when it is neither and the hub cannot be reached."""
    import os

    from transformers import AutoConfig

    if Path(name_or_path).is_dir():
        return {}
    try:
        AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        return {"local_files_only": True}
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") or not hub_reachable():
        raise ModelLoadError(
            f"could not load base model {name_or_path!r}: it is not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the hub cannot be reached.\n"
            + HOW_TO_SUPPLY.format(name=name_or_path))
    return {}


def load_base_model(name_or_path: str, device: str = "auto", dtype: str = "auto",
                    quantization: str = "none") -> ResidentModel:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    q = resolve_quant(quantization, dev)
    options = _hub_options(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **options)
        model = GPT2LMHeadModel.from_pretrained(name_or_path, trust_remote_code=False, dtype=dt, **options)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load base model {name_or_path!r}: {e}\n"
                             + HOW_TO_SUPPLY.format(name=name_or_path)) from e
    if model.config.model_type != "gpt2":
        raise ModelLoadError(f"{name_or_path!r} is a {model.config.model_type!r} model; Switchboard serves GPT-2")
    model.to(dev).eval()  # type: ignore[arg-type]  # (transformers' stub for .to is too narrow)
    model.requires_grad_(False)
    log.info("loaded %s on %s as %s (quantisation: %s)", name_or_path, dev, dt, q)
    resident = resident_model(model_id_of(name_or_path), model, tokenizer, dev, dt)
    resident.source, resident.quant = name_or_path, q
    return resident


def model_id_of(name_or_path: str) -> str:
    """The name the API lists the base model under: a hub id as given, a folder by its last part."""
    return name_or_path.rstrip("/").rsplit("/", 1)[-1] if "/" in name_or_path else name_or_path


def resident_model(model_id: str, model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerBase,
                   device: torch.device, dtype: torch.dtype) -> ResidentModel:
    """Describe a loaded model for serving (its fingerprint and LoRA-targetable modules); the
    benchmarks use it for models they build in memory."""
    return ResidentModel(model_id=model_id, model=model, tokenizer=tokenizer, device=device, dtype=dtype,
                         fingerprint=base_fingerprint(model), module_shapes=targetable_modules(model))
