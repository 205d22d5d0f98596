"""Unified LoRA's adaptive training controller, as a ``transformers.TrainerCallback``.

Unified LoRA (S. Vargiu, 2025) drives training from a stress signal φ(t)::

    E_s = β·E_s + (1 − β)·ℓ̃        (EMA of the normalised loss)
    D   = E_s / (1 + E_s)           (squashed into [0, 1))
    φ   = (1 − α)·φ + α·D           (slow EMA of the stress)

and switches mode on φ: single (φ < θ0), multi (θ0 ≤ φ < θ1), mirror (φ ≥ θ1), lowering
the learning rate as stress rises (seed: 5e-5 / 3e-5 / 1e-5, i.e. ×1, ×0.6, ×0.2 of the
configured rate here) and, in mirror mode, restoring a snapshot of the adapter weights
taken before the shock.

Deviations, and why:

* ``ℓ̃ = loss / loss_scale``. The seed feeds the raw loss, which works for its
  classification losses around 0.5 but would pin a language model (loss 2–6 nats) in
  mirror mode for good. By default ``loss_scale`` is twice the mean loss of the first
  ``calibration_steps`` steps, so ordinary training starts at ℓ̃ ≈ 0.5 → φ ≈ 0.33 — the
  seed's own "multi, stable" operating point — and a several-fold loss shock reaches
  mirror mode. Pass ``loss_scale=1.0`` for the seed's raw formula.
* The learning rate of each mode multiplies whatever the Trainer's scheduler set for the
  step (warm-up and decay keep working) instead of replacing it with a constant.
* With one adapter being trained, "single" and "multi" differ only in learning rate; the
  seed's per-task adapters are out of scope for a single-adapter run.
* Snapshots (copies of the trainable LoRA tensors) are taken every ``snapshot_every`` steps
  while not in mirror mode and not under a rising stress, and the one with the lowest
  smoothed loss is restored when mirror mode is entered; the restored tensors' optimizer
  state is cleared, since Adam moments from the shock would push the weights straight back.

Every step's loss, E_s, D, φ, mode, learning rate and event go to a JSONL file.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

log = logging.getLogger(__name__)

MODES = ("single", "multi", "mirror")


@dataclass
class ControllerConfig:
    """Unified LoRA's constants (α, β, θ0, θ1) plus the knobs its README leaves implicit."""

    alpha: float = 0.1
    beta: float = 0.9
    theta0: float = 0.3
    theta1: float = 0.7
    lr_multipliers: tuple[float, float, float] = (1.0, 0.6, 0.2)
    loss_scale: float | None = None
    calibration_steps: int = 10
    snapshot_every: int = 10
    max_snapshots: int = 3
    spike_factor: float = 2.0
    rising_margin: float = 0.02


@dataclass
class StepRecord:
    step: int
    loss: float
    loss_smooth: float
    stress: float
    phi: float
    mode: str
    lr_multiplier: float
    lr: float | None = None
    event: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class StressController:
    """The pure φ(t) state machine: feed it losses, it says the mode and what to do."""

    def __init__(self, config: ControllerConfig | None = None) -> None:
        self.config = config or ControllerConfig()
        self.loss_scale = self.config.loss_scale
        self._calibration: list[float] = []
        self.e_smooth: float | None = None
        self.phi: float | None = None
        self.mode = "single"
        self.steps = 0

    def _normalise(self, loss: float) -> float:
        if self.config.loss_scale is not None:
            return loss / self.config.loss_scale
        if len(self._calibration) < self.config.calibration_steps:
            self._calibration.append(loss)
            self.loss_scale = max(2.0 * sum(self._calibration) / len(self._calibration), 1e-8)
        assert self.loss_scale is not None
        return loss / self.loss_scale

    def mode_for(self, phi: float) -> str:
        if phi < self.config.theta0:
            return "single"
        return "multi" if phi < self.config.theta1 else "mirror"

    def update(self, loss: float, step: int | None = None) -> StepRecord:
        """Advance one step. ``event`` is ``restore`` on entering mirror mode, ``snapshot``
        when a healthy snapshot should be captured, else ``None``."""
        cfg = self.config
        self.steps += 1
        if not torch.isfinite(torch.tensor(loss)):
            loss = float("inf")
        x = self._normalise(min(loss, 1e6))
        self.e_smooth = x if self.e_smooth is None else cfg.beta * self.e_smooth + (1 - cfg.beta) * x
        d = self.e_smooth / (1.0 + self.e_smooth)
        prev_phi = d if self.phi is None else self.phi
        self.phi = d if self.phi is None else (1 - cfg.alpha) * self.phi + cfg.alpha * d
        previous_mode, self.mode = self.mode, self.mode_for(self.phi)
        event = None
        if self.mode == "mirror" and previous_mode != "mirror":
            event = "restore"
        elif (
            self.mode != "mirror"
            and self.steps > cfg.calibration_steps
            and self.steps % cfg.snapshot_every == 0
            and x <= cfg.spike_factor * self.e_smooth
            and d <= prev_phi + cfg.rising_margin
        ):
            event = "snapshot"
        return StepRecord(
            step=self.steps if step is None else step,
            loss=loss,
            loss_smooth=self.e_smooth,
            stress=d,
            phi=self.phi,
            mode=self.mode,
            lr_multiplier=cfg.lr_multipliers[MODES.index(self.mode)],
            event=event,
        )


class MirrorBank:
    """Snapshots of a model's trainable tensors, tagged with the smoothed loss when taken."""

    def __init__(self, max_snapshots: int = 3) -> None:
        self.snapshots: deque[tuple[float, int, dict[str, torch.Tensor]]] = deque(maxlen=max_snapshots)

    @staticmethod
    def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def capture(self, model: nn.Module, score: float, step: int) -> None:
        self.snapshots.append(
            (score, step, {n: p.detach().clone() for n, p in self.trainable(model).items()})
        )

    def restore(self, model: nn.Module, optimizer: Any = None) -> int | None:
        """Copy the best snapshot back; returns its step, or ``None`` when there is none."""
        if not self.snapshots:
            return None
        _, step, tensors = min(self.snapshots, key=lambda s: s[0])
        params = self.trainable(model)
        inner = getattr(optimizer, "optimizer", optimizer)
        with torch.no_grad():
            for name, saved in tensors.items():
                if name in params:
                    params[name].copy_(saved)
                    if inner is not None and hasattr(inner, "state"):
                        inner.state.pop(params[name], None)
        return step


class AdaptiveControllerCallback(TrainerCallback):
    """Runs :class:`StressController` inside ``Trainer``: per-step loss in, lr and restores out.

    It forces a log event every step (the Trainer's logged loss is the controller's input)
    and scales each param group's lr after the scheduler has set it for the next step.
    """

    def __init__(self, log_path: str | Path, config: ControllerConfig | None = None) -> None:
        self.config = config or ControllerConfig()
        self.controller = StressController(self.config)
        self.bank = MirrorBank(self.config.max_snapshots)
        self.log_path = Path(log_path)
        self.records: list[StepRecord] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def on_step_end(self, args, state, control, **kwargs):
        control.should_log = True
        return control

    def on_log(
        self, args, state, control, logs=None, model=None, optimizer=None, lr_scheduler=None, **kwargs
    ):
        if not logs or "loss" not in logs or model is None:
            return
        rec = self.controller.update(float(logs["loss"]), step=state.global_step)
        if rec.event == "snapshot":
            self.bank.capture(model, rec.loss_smooth, state.global_step)
        elif rec.event == "restore":
            restored = self.bank.restore(model, optimizer)
            rec.extra["restored_step"] = restored
            log.warning(
                "controller: loss shock at step %d (φ=%.3f): mirror mode, %s",
                state.global_step,
                rec.phi,
                f"restored snapshot of step {restored}" if restored is not None else "no snapshot to restore",
            )
        rec.lr = self._apply_lr(optimizer, lr_scheduler, rec.lr_multiplier)
        self.records.append(rec)
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(rec)) + "\n")

    @staticmethod
    def _apply_lr(optimizer: Any, lr_scheduler: Any, multiplier: float) -> float | None:
        if optimizer is None:
            return None
        groups = optimizer.param_groups
        if lr_scheduler is not None and hasattr(lr_scheduler, "get_last_lr"):
            base = list(lr_scheduler.get_last_lr())
        else:
            # No scheduler: remember each group's own lr once, so multipliers never compound.
            base = [g.setdefault("controller_base_lr", g.get("initial_lr", g["lr"])) for g in groups]
        for group, lr in zip(groups, base, strict=False):
            group["lr"] = lr * multiplier
        return float(groups[0]["lr"]) if groups else None

    def summary(self) -> dict[str, Any]:
        """What goes into ``switchboard.json``: mode counts, restores, final φ."""
        counts = {m: sum(1 for r in self.records if r.mode == m) for m in MODES}
        return {
            "config": {k: v for k, v in asdict(self.config).items()},
            "loss_scale": self.controller.loss_scale,
            "steps_by_mode": counts,
            "restores": [r.extra.get("restored_step") for r in self.records if r.event == "restore"],
            "final_phi": self.records[-1].phi if self.records else None,
            "log": self.log_path.name,
        }


def read_controller_log(path: Path) -> list[dict[str, Any]]:
    """Parse a controller JSONL log (for reports and plots)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
