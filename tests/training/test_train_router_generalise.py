"""Crop augmentation and early stopping of the MLP router (training/router_generalise.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import TrainerControl, TrainerState

from router_core.mlp import MLPRouterNet
from training.router_generalise import EarlyStopping, crops, route_loss_and_accuracy


def test_crops_are_contiguous_word_windows() -> None:
    text = "one two three four five six seven eight nine ten"
    out, owners = crops([text, "too short"], [1, 0], copies=5, seed=3)
    assert owners == [1] * 5  # short texts are left alone
    for c in out:
        words = c.split()
        assert 4 <= len(words) <= 10 and " ".join(words) in text
    assert crops([text], [1], copies=5, seed=3) == (out, owners)  # seeded


def test_early_stopping_keeps_the_best_epoch_and_stops() -> None:
    torch.manual_seed(0)
    net = MLPRouterNet(8, 2, 0, hidden=16, dropout=0.0)
    x = F.normalize(torch.randn(20, 8), dim=-1)
    y = (x[:, 0] > 0).long()
    stop = EarlyStopping(net, x, y, patience=2)
    state, control = TrainerState(), TrainerControl()
    state.epoch = 1
    stop.on_epoch_end(None, state, control)
    best = {k: v.clone() for k, v in net.state_dict().items()}
    loss_best = route_loss_and_accuracy(net, x, y)[0]
    for epoch in (2, 3):  # make the net worse twice: stop after `patience` bad epochs
        with torch.no_grad():
            net.route_head.bias.copy_(torch.tensor([5.0, -5.0]) * epoch)
        state.epoch = epoch
        stop.on_epoch_end(None, state, control)
        assert control.should_training_stop == (epoch == 3)
    stop.restore_best()
    assert all(torch.equal(best[k], v) for k, v in net.state_dict().items())
    assert stop.best_epoch == 1 and abs(stop.best_loss - loss_best) < 1e-6 and len(stop.history) == 3
