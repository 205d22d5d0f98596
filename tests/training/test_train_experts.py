"""`switchboard-train experts`: complexity tiers with the spaCy analyzer, one adapter per tier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.cli import main
from training.data import load_examples

DATA = "alpaca_gpt4_en_demo/alpaca_en_demo.json"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_experts_train_one_adapter_per_tier(
    tiny_model_dir: Path, sample_data: Path, tmp_path: Path, capsys
) -> None:
    from router_core.complexity import ComplexityAnalyzer

    examples, _ = load_examples(sample_data / DATA, limit=45)
    scores = sorted(r.score for r in ComplexityAnalyzer().analyze([ex.routing_text for ex in examples]))
    # Tertile thresholds, so every tier has enough examples whatever the analyzer's calibration.
    lo, hi = scores[len(scores) // 3], scores[2 * len(scores) // 3]
    store = tmp_path / "store"
    args = [
        "experts",
        "--base-model",
        str(tiny_model_dir),
        "--adapter-dir",
        str(store),
        "--data",
        str(sample_data / DATA),
    ]
    args += [
        "--limit",
        "45",
        "--thresholds",
        f"{lo},{hi}",
        "--prefix",
        "tier",
        "--max-steps",
        "3",
        "--rank",
        "4",
    ]
    args += ["--alpha", "8", "--max-length", "48", "--batch-size", "4", "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "complexity tiers: tier0=" in out
    sizes = None
    for tier in range(3):
        m = json.loads((store / f"tier{tier}" / "switchboard.json").read_text())
        cx = m["training"]["complexity"]
        assert cx["tier"] == tier and cx["thresholds"] == pytest.approx([lo, hi]) and cx["parser"] is True
        sizes = sizes or cx["tier_sizes"]
        assert cx["tier_sizes"] == sizes
        assert m["training"]["n_train"] + m["training"]["n_validation"] == sizes[f"tier{tier}"]
        assert lo <= cx["score_range"][0] or tier == 0
        assert (store / f"tier{tier}" / "adapter_model.safetensors").is_file()
    assert sum(sizes.values()) == 45 and min(sizes.values()) >= 10
    assert out.count("adapter tier") == 3

    # A complexity router over the experts, labelled by tier, from the prompts each expert kept.
    router = [
        "router",
        "--base-model",
        str(tiny_model_dir),
        "--adapter-dir",
        str(store),
        "--name",
        "complexity",
    ]
    router += ["--adapters", "tier0,tier1,tier2", "--labels", "tier", "--thresholds", f"{lo},{hi}"]
    router += ["--max-steps", "30", "-q"]
    assert main(router) == 0
    cfg = json.loads((store / "_routers" / "complexity" / "router.json").read_text())
    assert cfg["adapters"] == ["tier0", "tier1", "tier2"] and cfg["extra"]["labels"] == "tier"
    assert cfg["extra"]["n_examples"] > 30
