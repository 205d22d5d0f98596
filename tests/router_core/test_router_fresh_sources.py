"""The default router on held-out sources added after the routers were compared (issue 25).

`tests/data/routing/heldout_{code,literature}_fresh.jsonl` (scripts/build_heldout_fresh.py) were
built, and committed, before any router was scored on them, so these numbers are not tuned.
Centroids are the 40 + 40 routing examples through MiniLM, built as the server builds them
(voting, fitted temperature, switch margin and confidence map).

Tcl, a language no example is written in, must meet the issue's target for code outside Python
(>= 95 %). Prose *about* software (the Zen of Python, licence paragraphs) is the open failure
docs/routing.md measures ("Form from the resident model's hidden states"): a topic encoder sends
it to `code`. That target is recorded as a strict xfail, so the day a router meets it the suite says so.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

NAMES = ("code", "literature")


@pytest.fixture(scope="module")
def routed() -> dict[str, dict[str, float]]:
    """Top-1 accuracy per fresh source: {label: {source: accuracy}}."""
    from router_core import CentroidRouter
    from router_core.artifacts import default_sentence_encoder_path, load_sentence_encoder
    from router_core.calibration import calibrated, with_fitted_confidence, with_fitted_switch_margin
    from tests.conftest import require_minilm
    from tests.routing_data import DATA, examples

    require_minilm()
    enc = load_sentence_encoder(default_sentence_encoder_path())
    router = with_fitted_confidence(with_fitted_switch_margin(calibrated(
        CentroidRouter(list(NAMES), [enc.embed_texts(examples(d)) for d in NAMES]))))
    out: dict[str, dict[str, float]] = {}
    for i, label in enumerate(NAMES):
        rows = [json.loads(line) for line in (DATA / f"heldout_{label}_fresh.jsonl").read_text().splitlines()]
        top = router.route(enc.embed_texts([r["text"] for r in rows])).argmax(1)  # [N]
        sources = [r["source"].split("/")[0] for r in rows]
        out[label] = {s: float((top[torch.tensor([x == s for x in sources])] == i).float().mean())
                      for s in dict.fromkeys(sources)}
    print(f"\nfresh held-out top-1 per source: {out}")
    return out


def test_fresh_code_language_routes_to_code(routed) -> None:
    assert set(routed["code"]) == {"tcl"} and set(routed["literature"]) == {"zen-of-python", "licence-prose"}
    assert routed["code"]["tcl"] >= 0.95, routed


@pytest.mark.xfail(strict=True, reason="topic, not form: prose about software routes to code (docs/routing.md)")
def test_fresh_prose_about_software_routes_to_literature(routed) -> None:
    assert min(routed["literature"].values()) >= 0.95, routed
