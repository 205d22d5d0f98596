"""What keeps the MLP router from memorising its training sources: crop augmentation and early
stopping on held-out data.

A router trained on CodeAlpaca instructions and Gutenberg paragraphs reaches 100 % on its own
validation split within a few epochs, then keeps sharpening on features that only those two
sources share (instruction phrasing, paragraph length) and does worse than the centroids on
text from elsewhere. Two remedies, both cheap:

* crops: extra training copies of each example cut to a random contiguous run of its words
  (30-100 %), the partial contexts a router really sees when it re-routes on a sliding window;
* early stopping: after every epoch the net is scored on a validation set, ideally from a
  *different source* (`--val-data`), and training stops when its loss has not improved for
  `patience` epochs; the best epoch's weights are kept.

Measured (MiniLM, 40 + 40 examples, 160 code / 150 literature texts from other sources): the
plain MLP routes 93.8 % of the code texts right, 80.6 % with two crops per example, and early
stopping on a third source (code requests and stories) changed nothing because that source was
already at 100 % and its loss kept falling. The centroid router's baseline-corrected voting
reaches 100 % on the same texts, so crops are off by default (`--augment`), early stopping is
on (it costs one small forward per epoch), and `switchboard-train eval --held-out` shows both
routers side by side.
"""

from __future__ import annotations

import copy
import logging
import random
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import TrainerCallback

log = logging.getLogger(__name__)
_WORDS = re.compile(r"\S+\s*")


def crops(texts: list[str], owners: list[int], copies: int, seed: int = 0,
          min_fraction: float = 0.3) -> tuple[list[str], list[int]]:
    """`copies` random word-window crops of each text (texts under 8 words are left alone)."""
    rng = random.Random(seed)
    out_texts, out_owners = [], []
    for text, owner in zip(texts, owners, strict=True):
        words = _WORDS.findall(text)
        if len(words) < 8:
            continue
        for _ in range(copies):
            n = rng.randint(max(4, int(min_fraction * len(words))), len(words))
            start = rng.randint(0, len(words) - n)
            out_texts.append("".join(words[start:start + n]).strip())
            out_owners.append(owner)
    return out_texts, out_owners


@torch.no_grad()
def route_loss_and_accuracy(net: nn.Module, features: Tensor, labels: Tensor) -> tuple[float, float]:
    """Cross-entropy and top-1 accuracy of `net` on `features` `[N, f]` / `labels` `[N]`."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    logits, _ = net(features.to(device))  # [N, n]
    net.train(was_training)
    labels = labels.to(device)
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(-1) == labels).float().mean())


class EarlyStopping(TrainerCallback):
    """Score the net on validation features after every epoch; stop after `patience` epochs
    without a lower loss, and put the best epoch's weights back at the end."""

    def __init__(self, net: nn.Module, features: Tensor, labels: Tensor, patience: int = 3) -> None:
        self.net, self.features, self.labels, self.patience = net, features, labels, patience
        self.best_loss = float("inf")
        self.best_epoch = 0
        self.best_state: dict[str, Tensor] | None = None
        self.history: list[dict[str, Any]] = []
        self._bad = 0

    def on_epoch_end(self, args, state, control, **kwargs):
        loss, acc = route_loss_and_accuracy(self.net, self.features, self.labels)
        epoch = int(round(state.epoch or 0))
        self.history.append({"epoch": epoch, "step": state.global_step, "val_loss": loss, "val_accuracy": acc})
        if loss < self.best_loss - 1e-4:
            self.best_loss, self.best_epoch, self._bad = loss, epoch, 0
            self.best_state = copy.deepcopy(self.net.state_dict())
        else:
            self._bad += 1
            if self._bad >= self.patience:
                log.info("early stop at epoch %d (best %d, val loss %.4f)", epoch, self.best_epoch, self.best_loss)
                control.should_training_stop = True
        return control

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.net.load_state_dict(self.best_state)
