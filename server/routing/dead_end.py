"""The 400 that `model: "auto"` answers when nothing is routable, written to end the dead end.

Each case names the command that fixes it: an empty store gets the starter adapters (`switchboard
demo`, or `switchboard-train adapter --data starter:NAME` plus a reload while the server runs);
adapters without a usable centroid and without the `examples.jsonl` a centroid is computed from at
load get the admin call that registers them with example prompts, or the Arrow router, which
needs none.
"""

from __future__ import annotations

import json
from pathlib import Path

from server.engine.registry import AdapterVersion


def _family(embedder_id: str | None) -> str:
    return (embedder_id or "").split(":", 1)[0]


def no_routable_message(adapters: dict[str, AdapterVersion], embedder_id: str, store: Path, base_model: str) -> str:
    """`adapters`: the registry's snapshot (name -> version); none of them has a usable centroid."""
    if not adapters:
        return (f"model 'auto' has no adapters to route over: the store {store} is empty. Stop the server and run "
                f"`switchboard demo --base-model {base_model} --adapter-dir {store}` (trains code, prose and "
                f"math starter adapters, then serves), or keep it running and train some with "
                f"`switchboard-train adapter --base-model {base_model} --adapter-dir {store} --name code "
                f"--data starter:code` (and --name prose --data starter:prose), then "
                f"`curl -X POST -H 'Authorization: Bearer <admin token>' <server>/admin/reload`")
    reasons = []
    for name, v in sorted(adapters.items()):
        w = v.weights
        if w.centroids is None:
            reasons.append(f"{name} has no centroid")
        else:
            reasons.append(f"{name}'s centroid is for embedder {w.centroid_embedder!r}")
    first = sorted(adapters)[0]
    body = json.dumps({"name": first, "path": adapters[first].weights.path.name,
                       "examples": ["<a prompt it should serve>", "<another>"]})
    return (f"model 'auto' cannot route: no loaded adapter has a centroid for embedder {embedder_id!r} "
            f"({'; '.join(reasons)}; none carries the examples.jsonl a centroid is computed from at load). "
            f"Register each with example prompts: `curl -H 'Authorization: Bearer <admin token>' "
            f"<server>/admin/adapters -H 'content-type: application/json' -d '{body}'`, or route without "
            f"examples with the Arrow router: `\"routing\": {{\"router\": \"arrow\"}}` in the request "
            f"(or `--router arrow` for every request)")
