"""Expected calibration error and the reliability table of routing decisions."""

from __future__ import annotations

import torch

from router_core.calibration import expected_calibration_error, reliability


def test_overconfident_wrong_decisions_raise_the_error():
    labels = torch.tensor([0, 0, 1, 1])
    honest = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.1, 0.9], [0.05, 0.95]])  # sure and right
    wrong_and_sure = torch.tensor([[0.99, 0.01], [0.99, 0.01], [0.99, 0.01], [0.01, 0.99]])  # one sure miss
    assert expected_calibration_error(wrong_and_sure, labels) > expected_calibration_error(honest, labels)
    # all right at confidence 1: perfectly calibrated
    assert expected_calibration_error(torch.eye(2)[labels], labels) == 0.0


def test_reliability_bins_count_every_decision():
    weights = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.3, 0.7], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1, 0])
    table = reliability(weights, labels, bins=5)
    assert sum(b["count"] for b in table) == 4
    top = next(b for b in table if b["high"] == 1.0)
    assert top["count"] == 1 and top["accuracy"] == 1.0 and abs(top["confidence"] - 0.95) < 1e-6
    # ECE of this table by hand: bins (0.4,0.6]: conf mean 0.525, acc 0.5 (n=2); (0.6,0.8]: 0.7, 1; (0.8,1]: 0.95, 1
    want = (2 * abs(0.525 - 0.5) + abs(0.7 - 1) + abs(0.95 - 1)) / 4
    assert abs(expected_calibration_error(weights, labels, bins=5) - want) < 1e-6
