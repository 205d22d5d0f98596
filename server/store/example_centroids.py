"""Centroids computed at load from an adapter's `examples.jsonl`, so `auto` can route to it.

`switchboard-train` keeps a sample of each adapter's training prompts in `examples.jsonl`. An
adapter that arrives with those prompts but without a centroid in the server's embedding space
(none at all, or one fitted with another embedder) would otherwise be invisible to `model:
"auto"`. This hook embeds the prompts with the active embedder, the same way
`POST /admin/adapters {"examples": [...]}` does, and keeps the centroid with the adapter. When
the centroid router reads form (`router_core.form`), it also reads the form of the first
examples for the adapter's form group, unless the centroid file already carries one: a centroid
written here or at registration keeps the group in its metadata, one beside a usable centroid
without it is read again from the examples at each start. A
missing centroid file is written beside the adapter (or beside the name, for a name that borrows
another adapter's folder) so a restart finds it; one fitted for another embedder is left on disk
untouched. A broken examples file never refuses the adapter: it is
served by name, just not routed, and the log says why.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from router_core.centroid import fit_centroids
from server.engine.adapter_weights import AdapterWeights
from server.store.adapters import SAVE_IF_POSSIBLE
from server.store.folder import file_in_store

log = logging.getLogger(__name__)
EXAMPLES_FILE = "examples.jsonl"
MAX_EXAMPLES = 256  # what training keeps by default
MAX_EXAMPLES_BYTES = 8 * 1024 * 1024


def read_example_prompts(path: Path, limit: int = MAX_EXAMPLES) -> list[str]:
    """The routing texts of `examples.jsonl` (each record's `query`, else its `prompt`; training's
    `Example.routing_text`), at most `limit`. Raises ValueError on a malformed file."""
    if path.stat().st_size > MAX_EXAMPLES_BYTES:
        raise ValueError(f"{path.name} is larger than {MAX_EXAMPLES_BYTES >> 20} MiB")
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if not isinstance(rec, dict):
            raise ValueError(f"{path.name}:{lineno}: not a JSON object")
        text = rec.get("query") or rec.get("prompt") or rec.get("text")
        if isinstance(text, str) and text.strip():
            text.encode("utf-8")  # lone surrogates (valid JSON escapes) raise here, not in the tokenizer
            texts.append(text)
        if len(texts) >= limit:
            break
    return texts


async def form_of(routing: Any, name: str, texts: list[str]) -> str | None:
    """The adapter's form group from its examples, or None (logged) when they cannot be read:
    the adapter is then routed on topic alone, never refused."""
    try:
        return await asyncio.to_thread(routing.example_form, texts)
    except Exception as e:
        log.warning("adapter %s: the form of its examples was not read (%s: %s)", name, type(e).__name__, str(e)[:200])
        return None


def centroids_from_examples(routing: Any, engine_call: Callable[[Callable[[], Any]], Awaitable[Any]]):
    """A `prepare` hook for `AdapterService.load`: fills in the centroid of an adapter that has
    example prompts but no centroid the router can use."""

    async def prepare(weights: AdapterWeights) -> str | None:
        usable = routing.centroid_usable(weights.centroids, weights.centroid_embedder)
        if usable and (getattr(routing, "form_reader", None) is None or weights.example_form is not None):
            return None  # nothing to compute: the examples file is not read
        path = weights.path / EXAMPLES_FILE
        try:
            if not path.is_file():
                return None
            texts = read_example_prompts(file_in_store(path, routing.store))
            if not texts:
                raise ValueError("no prompts in it")
            if weights.example_form is None:  # the form group the centroid router's form term needs
                weights.example_form = await form_of(routing, weights.name, texts)
            if usable:
                return None
            emb = await routing.embed_examples(texts, engine_call)  # [n, d]
            centroid = fit_centroids(emb.float().cpu(), k=64)  # [min(n, 64), d]: examples kept as rows (voting)
        except Exception as e:  # any bad file: the adapter is served by name, just not routed
            log.warning("adapter %s: no centroid from %s (%s: %s); it is not routable", weights.name,
                        EXAMPLES_FILE, type(e).__name__, str(e)[:200])
            return None
        weights.centroids, weights.centroid_embedder = centroid, routing.embedder_id
        log.info("adapter %s: centroid computed from %d prompts in %s (embedder %s)", weights.name,
                 len(texts), EXAMPLES_FILE, routing.embedder_id)
        # saved if there is no file yet (one fitted for another embedder stays); a read-only store
        # still routes, and the next start recomputes
        return SAVE_IF_POSSIBLE

    return prepare
