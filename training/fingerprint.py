"""Base-model fingerprint recorded in ``switchboard.json``.

The server refuses an adapter whose ``base_fingerprint`` differs from its resident
model's, because a LoRA trained on another base (same module names, other weights or
shapes) loads without error and produces nonsense. The server imports nothing from
``training``; it carries a copy of :func:`base_fingerprint`, so the definition below is
the contract and must stay byte-for-byte reproducible:

1. ``config`` = ``{key: getattr(model.config, key, None)}`` for the keys
   ``model_type, n_layer, n_embd, n_head, vocab_size, n_positions`` (in that set).
2. ``params`` = ``[[name, list(param.shape)] for name, param in model.named_parameters()]``
   sorted by name. ``named_parameters()`` with its default ``remove_duplicate=True``, so a
   tied ``lm_head.weight`` is not listed twice. Call it on the *plain* causal-LM model as
   ``AutoModelForCausalLM.from_pretrained`` returns it (e.g. ``GPT2LMHeadModel``), before
   any PEFT or multi-LoRA wrapping renames modules.
3. ``payload = json.dumps({"config": config, "params": params}, sort_keys=True)`` (the
   default separators ``", "`` and ``": "``; ``(name, shape)`` tuples serialise as lists).
4. The fingerprint is ``hashlib.sha256(payload.encode("utf-8")).hexdigest()`` (64 lowercase
   hex characters).

It depends on shapes only, not on values, dtype or device, so an fp16 CUDA server and an
fp32 CPU trainer agree; it is a guard against mismatched architectures and vocabularies,
not a checksum of the weights.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

FINGERPRINT_CONFIG_KEYS = ("model_type", "n_layer", "n_embd", "n_head", "vocab_size", "n_positions")


def base_fingerprint(model: nn.Module) -> str:
    """sha256 hex of the base model's config subset and sorted parameter names + shapes."""
    config = {key: getattr(model.config, key, None) for key in FINGERPRINT_CONFIG_KEYS}  # type: ignore[union-attr]
    params = sorted([name, list(param.shape)] for name, param in model.named_parameters())
    payload = json.dumps({"config": config, "params": params}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
