"""LoRAX's request fields on the OpenAI routes: served with LoRAX's meaning, or a 400 naming them.

Clients written for LoRAX send its adapter fields in OpenAI bodies too. Ignoring them (the
default for unknown fields) would answer from the base model when the client asked for an
adapter, so each one is decided here (docs/clients.md lists them):

* `adapter_id`: the adapter to use, LoRAX's name for it. With `model` naming the base model (or
  equal to it) it is served as `model: <adapter_id>`; naming a different adapter is a 400.
* `adapter_source`: only `local` (the store) is served; `hub`, `s3`, `pbase` would download, a
  400 (register the folder with `POST /admin/adapters` first).
* `api_token`: a hub credential for downloading, never used here: a 400 unless empty.
* `merged_adapters`: a 400. LoRAX's `linear` merge averages each LoRA factor separately
  (ΔW = (Σ w·B)(Σ w·A), same rank required); Switchboard's mixture sums the adapters' deltas
  (Σ w·B·A, PEFT's `cat`), so serving it under LoRAX's name would not be the same model. The
  message points at `routing.weights` (with `model: "auto"`), which is the mixture this server has.
* `parameters`: the body of LoRAX's `/generate`; on the OpenAI routes a 400 that says to send
  its fields at the top level.
"""

from __future__ import annotations

from typing import Any

from server.engine.errors import InvalidRequest

FIELDS = frozenset({"adapter_id", "adapter_source", "api_token", "merged_adapters", "parameters"})
UNSUPPORTED = "unsupported_parameter"


def adapter_for(model: str, extra: dict[str, Any] | None, base_names: set[str]) -> str:
    """The model the request is served by, once LoRAX's fields are applied (400 for the ones that
    cannot be served)."""
    extra = extra or {}
    if extra.get("parameters") is not None:
        raise InvalidRequest("`parameters` is the body of LoRAX's /generate; on the OpenAI routes send its fields "
                             "at the top level (adapter_id, temperature, max_tokens, ...)", param="parameters",
                             code=UNSUPPORTED)
    if extra.get("merged_adapters") is not None:
        raise InvalidRequest("`merged_adapters` (LoRAX merges each LoRA factor separately) is not supported; "
                             "for a weighted mixture of adapters' deltas send model 'auto' with "
                             "routing.weights {name: weight}", param="merged_adapters", code=UNSUPPORTED)
    source = extra.get("adapter_source")
    if source not in (None, "local"):
        raise InvalidRequest(f"adapter_source {str(source)[:40]!r}: this server serves only adapters in its store "
                             "('local'); register the folder with POST /admin/adapters", param="adapter_source",
                             code=UNSUPPORTED)
    if extra.get("api_token") not in (None, ""):
        raise InvalidRequest("`api_token` is for downloading adapters, which this server never does",
                             param="api_token", code=UNSUPPORTED)
    adapter = extra.get("adapter_id")
    if adapter is None or adapter == model:
        return model
    if not isinstance(adapter, str) or not adapter:
        raise InvalidRequest("adapter_id must be an adapter name", param="adapter_id")
    if model not in base_names:
        raise InvalidRequest(f"adapter_id {adapter[:64]!r} and model {model[:64]!r} name different adapters; "
                             "send one of them", param="adapter_id")
    return adapter
