"""The adapter store's rules, defined once for the server (which reads the store) and training
(which writes it): adapter names, file names, the base-model fingerprint, device resolution.

The format itself is described in docs/architecture.md ("The adapter store"). Each side turns a
`StoreRuleError` into its own error type (an HTTP 400 on the server, a one-line CLI error in
training); the rules and their messages live here.
"""

from __future__ import annotations

import hashlib
import json
import re

import torch
from torch import nn

# -- names -----------------------------------------------------------------------------------------
# Names become folder names and Prometheus label values: a small safe alphabet, no colons or
# slashes. `\Z`, not `$`, which would also accept a trailing newline.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")
RESERVED_NAMES = frozenset({"auto", "base"})  # request `model` values that never name an adapter

# -- file and folder names ---------------------------------------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"  # PEFT
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT, safetensors only (a pickle .bin is refused)
META_FILE = "switchboard.json"  # version, base_fingerprint, training and eval records
CENTROID_FILE = "centroid.safetensors"  # routing centroids [m, d] + the embedder that made them
EXAMPLES_FILE = "examples.jsonl"  # training prompts kept to refit centroids
CONTROLLER_LOG = "controller.jsonl"  # the adaptive training controller's log
ROUTERS_DIR = "_routers"  # <store>/_routers/<name>/ holds MLP routers
MANIFEST_FILE = "_manifest.json"  # what the admin API registered, restored at start
WORK_DIR = ".work"  # training scratch; a dot-folder is never an adapter


class StoreRuleError(ValueError):
    """A name, device or file that breaks the store's rules; the message is for the user."""


def name_is_valid(name: object) -> bool:
    return isinstance(name, str) and NAME_PATTERN.match(name) is not None and name.lower() not in RESERVED_NAMES


def check_name(name: object) -> str:
    """`name` if it may name an adapter or router; else `StoreRuleError` saying what is allowed."""
    if not name_is_valid(name):
        raise StoreRuleError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '_', '-', '.', starting with a "
            f"letter or digit (reserved: {sorted(RESERVED_NAMES)})"
        )
    assert isinstance(name, str)
    return name


# -- base fingerprint --------------------------------------------------------------------------------
FINGERPRINT_CONFIG_KEYS = ("model_type", "n_layer", "n_embd", "n_head", "vocab_size", "n_positions")


def base_fingerprint(model: nn.Module) -> str:
    """sha256 hex of the base model's architecture, recorded by training in ``switchboard.json``.

    The server refuses an adapter whose ``base_fingerprint`` differs from its resident model's: a
    LoRA trained on another base (same module names, other shapes or vocabulary) would load
    without error and produce nonsense. The recipe, which must stay byte-for-byte stable since
    stores outlive releases:

    1. ``config`` = ``{key: getattr(model.config, key, None)}`` for `FINGERPRINT_CONFIG_KEYS`.
    2. ``params`` = ``[[name, list(param.shape)] for name, param in model.named_parameters()]``
       sorted by name (default ``remove_duplicate=True``, so a tied ``lm_head.weight`` is listed
       once), on the plain causal-LM model as ``from_pretrained`` returns it, before any PEFT or
       multi-LoRA wrapping renames modules.
    3. ``payload = json.dumps({"config": config, "params": params}, sort_keys=True)``.
    4. The fingerprint is ``sha256(payload.encode("utf-8")).hexdigest()`` (64 lowercase hex).

    Shapes only, not values, dtype or device: an fp16 CUDA server and an fp32 CPU trainer agree.
    It guards against mismatched architectures, it is not a checksum of the weights.
    """
    config = {key: getattr(model.config, key, None) for key in FINGERPRINT_CONFIG_KEYS}  # type: ignore[union-attr]
    params = sorted([name, list(param.shape)] for name, param in model.named_parameters())
    payload = json.dumps({"config": config, "params": params}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# -- devices -----------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` means CUDA when there is one; an explicit ``cuda`` without one is an error, not a
    silent fall-back to the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StoreRuleError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)
