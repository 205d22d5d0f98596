"""``switchboard-train centroids``: refit the centroids of existing adapters.

Centroids belong to an embedder: switching the server from ``base`` to a sentence encoder
(or changing the base window) makes every stored centroid meaningless. Each adapter keeps
a sample of its training prompts in ``examples.jsonl``, so its centroids can be recomputed
with any embedder, as one mean vector or ``k`` k-means centroids, without retraining.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from router_core.store_rules import base_fingerprint
from training.data import read_examples
from training.embedding import embed, make_embedder
from training.store import (
    CENTROID_FILE,
    EXAMPLES_FILE,
    TrainingError,
    adapter_folder,
    list_adapters,
    load_base,
    make_readable,
    pick_device,
    read_meta,
    write_json,
)

log = logging.getLogger(__name__)


def recompute_centroids(
    store: Path,
    base_model: str | None,
    adapters: list[str] | None = None,
    embedder_spec: str = "base",
    k: int = 64,
    seed: int = 0,
    device: str = "auto",
    embedder: Any = None,
) -> dict[str, dict[str, Any]]:
    """Refit and save ``centroid.safetensors`` for ``adapters`` (default: all in the store)."""
    from router_core.artifacts import save_centroids
    from router_core.centroid import fit_centroids

    if k < 1:
        raise TrainingError("--k must be >= 1")
    names = adapters or list_adapters(store)
    if not names:
        raise TrainingError(f"no adapters in {store}")
    folders = {n: adapter_folder(store, n) for n in names}
    missing = [n for n, f in folders.items() if not (f / EXAMPLES_FILE).is_file()]
    if missing:
        raise TrainingError(
            f"no {EXAMPLES_FILE} in {', '.join(missing)}: centroids need example prompts (adapters trained "
            f"by switchboard-train keep a sample; for others, register them with examples through the server)"
        )
    if embedder is None:
        embedder = _embedder_for(store, folders, base_model, embedder_spec, pick_device(device))
    results: dict[str, dict[str, Any]] = {}
    for name, folder in folders.items():
        prompts = [ex.routing_text for ex in read_examples(folder / EXAMPLES_FILE) if ex.routing_text.strip()]
        if not prompts:
            raise TrainingError(f"{folder / EXAMPLES_FILE}: no prompts")
        centroids = fit_centroids(embed(embedder, prompts), k=k, seed=seed)
        save_centroids(folder / CENTROID_FILE, centroids, embedder.id)
        info = {"embedder": embedder.id, "k": int(centroids.shape[0]), "n_examples": len(prompts)}
        meta = read_meta(folder)
        if meta:
            meta["centroids"] = info
            write_json(folder / "switchboard.json", meta)
        make_readable(folder)
        results[name] = info
        log.info(
            "centroids of %s: %d x %d (%s) from %d prompts", name, *centroids.shape, embedder.id, len(prompts)
        )
    return results


def _embedder_for(
    store: Path, folders: dict[str, Path], base_model: str | None, spec: str, device: torch.device
) -> Any:
    model = tokenizer = None
    if spec == "base" or spec.startswith("base:"):
        recorded = {read_meta(f).get("base_model") for f in folders.values()} - {None}
        base_model = base_model or (recorded.pop() if len(recorded) == 1 else None)
        if not base_model:
            raise TrainingError("the base embedder needs --base-model")
        model, tokenizer = load_base(base_model, device)
        fp = base_fingerprint(model)
        for name, folder in folders.items():
            other = read_meta(folder).get("base_fingerprint")
            if other and other != fp:
                log.warning(
                    "%s was trained on another base model (fingerprint differs from %s)", name, base_model
                )
    return make_embedder(spec, model, tokenizer, device)
