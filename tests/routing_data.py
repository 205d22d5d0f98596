"""The routing test data shipped in tests/data/routing/ (sources and licences in its README)."""

from __future__ import annotations

import json

from tests import paths

DATA = paths.DATA / "routing"
DOMAINS = ("code", "literature")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def examples(domain: str) -> list[str]:
    """The 40 centroid examples of `domain` (CodeAlpaca instructions / Gutenberg paragraphs)."""
    return [r["text"] for r in _rows(f"examples_{domain}.jsonl")]


def held_out(domain: str) -> list[dict]:
    """`{"text", "source"}` rows of `domain` from sources unlike the examples."""
    return _rows(f"heldout_{domain}.jsonl")
