"""Complexity-aware MoLoRA's three training phases for the MLP router, as Trainer pieces.

:class:`RouterObjective` is the module the Trainer optimises: the router net, optionally
the experts' LoRA mixture, and the loss of the current phase. :class:`PhaseCallback`
switches phase at step boundaries (and what is trainable); :class:`RouterTrainer` gives
the router and the experts their own learning rates. Keeping the phases in callbacks,
not in a custom loop, is what lets the same run go under ``torchrun`` / ``accelerate``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from training.lm import shifted_nll
from training.store import TrainingError

log = logging.getLogger(__name__)
PHASES = ("router", "expert", "joint")


class RouterObjective(nn.Module):
    """The trainable whole: router net (+ LoRA mixture in expert/joint phases) and the loss."""

    def __init__(self, net: nn.Module, cfg: Any, mixture: Any = None) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.mixture = mixture
        self.lm = mixture.model if mixture is not None else None
        self.phase = "router"

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        for p in self.net.parameters():
            p.requires_grad_(phase in ("router", "joint"))
        if self.mixture is not None:
            for p in self.mixture.lora_parameters():
                p.requires_grad_(phase in ("expert", "joint"))

    def forward(
        self, features, route_labels, complexity_target, input_ids=None, attention_mask=None, labels=None
    ):
        from router_core.mlp import load_balance_loss

        logits, cpred = self.net(features)  # [B, n], [B]
        probs = torch.softmax(logits, -1)  # [B, n]
        route_loss = (
            F.cross_entropy(logits, route_labels)
            + self.cfg.lb_weight * load_balance_loss(probs)
            + self.cfg.complexity_weight * F.mse_loss(cpred, complexity_target)
        )
        if self.phase == "router" or self.lm is None or input_ids is None:
            return {"loss": route_loss, "logits": logits}
        self.mixture.set_gates(probs if self.phase == "joint" else probs.detach())
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask)
        nll, n = shifted_nll(out.logits, labels)
        lm_loss = nll / n.clamp(min=1)
        loss = lm_loss + route_loss if self.phase == "joint" else lm_loss
        return {"loss": loss, "logits": logits}


class PhaseCallback(TrainerCallback):
    """Switches the objective's phase (and what is trainable) at step boundaries."""

    def __init__(self, objective: RouterObjective, schedule: list[tuple[str, int]]) -> None:
        self.objective = objective
        self.schedule = schedule  # (phase, first step after it)
        self.history: list[tuple[int, str]] = []

    def phase_at(self, step: int) -> str:
        return next((ph for ph, end in self.schedule if step < end), self.schedule[-1][0])

    def on_step_begin(self, args, state, control, **kwargs):
        phase = self.phase_at(state.global_step)
        if phase != self.objective.phase or not self.history:
            self.objective.set_phase(phase)
            self.history.append((state.global_step, phase))
            log.info("router training: phase %s from step %d", phase, state.global_step)


class RouterTrainer(Trainer):
    """Trainer with two optimizer groups: router (complexity-aware MoLoRA: 1e-3) and experts (5e-5)."""

    def __init__(self, *args, router_lr: float, expert_lr: float, **kwargs) -> None:
        self.router_lr, self.expert_lr = router_lr, expert_lr
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            obj = self.model
            groups = [{"params": list(obj.net.parameters()), "lr": self.router_lr, "weight_decay": 0.0}]
            if obj.mixture is not None:
                groups.append(
                    {"params": obj.mixture.lora_parameters(), "lr": self.expert_lr, "weight_decay": 0.0}
                )
            self.optimizer = torch.optim.AdamW(groups)
        return self.optimizer


def phase_schedule(
    phases: tuple[str, ...], split: tuple[float, ...] | None, total: int
) -> list[tuple[str, int]]:
    """``[(phase, end_step), ...]`` dividing ``total`` steps by the ``split`` weights."""
    weights = list(split) if split else [1.0] * len(phases)
    if len(weights) != len(phases) or any(w <= 0 for w in weights):
        raise TrainingError("--phase-split needs one positive weight per phase")
    ends, acc = [], 0.0
    for phase, w in zip(phases, weights, strict=True):
        acc += w
        ends.append((phase, int(round(total * acc / sum(weights)))))
    return ends
