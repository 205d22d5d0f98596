"""Routed mixtures help, not blur: on held-out passages the centroid router's mixture, re-routed
the way the server does (whole-prompt first decision, 32-token re-route windows, fitted
temperature and switch margin), is no worse than the best single adapter on each domain.

The small run of docs/routing.md on the suite's own data: the tiny GPT-2, a `code` adapter on
CodeAlpaca and a `lit` adapter on Gutenberg, 150 steps each, MiniLM centroids from their
training prompts; the validation split (never trained on) is scored with teacher forcing. No
tolerance: routed perplexity must be <= the best single adapter's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import require_minilm
from training.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TRAIN = ["--rank", "8", "--alpha", "16", "--lr", "3e-3", "--batch-size", "8", "--max-length", "96",
         "--embedder", "minilm", "--max-steps", "150", "-q"]
DATA = {"code": "codealpaca/code_alpaca_2k.json", "lit": "gutenberg"}


@pytest.fixture(scope="module")
def minilm_store(tmp_path_factory, tiny_model_dir: Path, sample_data: Path) -> Path:
    require_minilm()
    store = tmp_path_factory.mktemp("ppl-store")
    for name, data in DATA.items():
        args = ["adapter", "--base-model", str(tiny_model_dir), "--adapter-dir", str(store),
                "--data", str(sample_data / data), "--name", name, *TRAIN]
        assert main(args) == 0
    return store


def _eval(store: Path, tiny_model_dir: Path, sample_data: Path, out: Path, *extra: str) -> dict:
    args = ["eval", "--base-model", str(tiny_model_dir), "--adapter-dir", str(store), "--out", str(out), "-q",
            "--data", *(f"{name}={sample_data / data}" for name, data in DATA.items()), *extra]
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


def test_routed_perplexity_at_most_the_best_single_adapter(
    minilm_store: Path, tiny_model_dir: Path, sample_data: Path, tmp_path: Path
) -> None:
    report = _eval(minilm_store, tiny_model_dir, sample_data, tmp_path / "report")
    cfg = report["config"]
    assert (cfg["route_window"], cfg["reroute_every"], cfg["switch_margin"]) == (32, 2, None)  # the server's defaults
    centroid = report["routing"]["centroid"]
    assert centroid["temperature"] < 1 and centroid["switch_margin"] > 0  # both fitted on the examples
    for domain, e in report["perplexity"].items():
        best = min(e["adapters"].values())
        assert e["adapters"][domain] == best < e["base"], (domain, e)  # each adapter is its domain's best
        assert e["routed"]["centroid"] <= best, (domain, e["routed"]["centroid"], best)
    table = (tmp_path / "report" / "report.md").read_text().split("## Perplexity")[1].split("\n\n")[1].splitlines()
    col = [c.strip() for c in table[0].split("|")].index("routed centroid")
    for row in table[2:]:  # the report marks it: ✓ = routed <= best single
        assert [c.strip() for c in row.split("|")][col].endswith("✓"), row
