"""Unified LoRA's adaptive controller: φ(t), modes, lr by mode, mirror restore after a loss shock."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from training.controller import AdaptiveControllerCallback, ControllerConfig, StressController

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LoraLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(4, 3))
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)


def test_seed_formula_operating_point() -> None:
    """With the auto scale a steady loss sits at ℓ̃ = 0.5 → φ = 1/3: Unified LoRA's 'multi, stable'."""
    ctl = StressController()
    for _ in range(50):
        rec = ctl.update(3.0)
    assert rec.loss_smooth == pytest.approx(0.5)
    assert rec.phi == pytest.approx(1 / 3, abs=1e-6)
    assert rec.mode == "multi" and rec.lr_multiplier == 0.6
    raw = StressController(ControllerConfig(loss_scale=1.0))  # the seed's raw formula
    for _ in range(200):
        rec = raw.update(0.2)
    assert rec.mode == "single" and rec.phi == pytest.approx(0.2 / 1.2, abs=1e-3)


def test_shock_triggers_mirror_restore_and_phi_recovers(tmp_path: Path) -> None:
    model = LoraLike()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    log_path = tmp_path / "controller.jsonl"
    cb = AdaptiveControllerCallback(log_path, ControllerConfig(snapshot_every=5, calibration_steps=5))
    cb.on_train_begin(None, None, None)
    step = 0

    def feed(loss: float) -> dict:
        nonlocal step
        step += 1
        # Adam state exists for the parameter, as in real training.
        model.lora_A.grad = torch.ones_like(model.lora_A)
        opt.step()
        cb.on_log(
            None, SimpleNamespace(global_step=step), None, logs={"loss": loss}, model=model, optimizer=opt
        )
        return cb.records[-1].__dict__

    for _ in range(60):
        feed(2.0)
    healthy = model.lora_A.detach().clone()
    phi_before = cb.records[-1].phi
    assert cb.records[-1].mode == "multi" and cb.bank.snapshots
    snap_step = cb.bank.snapshots[-1][1]

    with torch.no_grad():  # the shock: weights blown up, loss explodes
        model.lora_A.add_(100.0)
    restore = None
    for _ in range(60):
        rec = feed(80.0)
        if rec["event"] == "restore":
            restore = rec
            break
    assert restore is not None, "the shock never reached mirror mode"
    assert restore["mode"] == "mirror" and restore["phi"] >= 0.7
    assert restore["extra"]["restored_step"] <= snap_step
    assert (model.lora_A - healthy).abs().max() < 0.1  # back to the pre-shock weights (plus few Adam steps)
    assert model.lora_A not in opt.state or not opt.state[model.lora_A]  # Adam moments of the shock dropped
    lr_mirror = opt.param_groups[0]["lr"]
    assert lr_mirror == pytest.approx(1e-3 * 0.2)

    modes_after = []
    for _ in range(150):
        modes_after.append(feed(2.0)["mode"])
    assert "multi" in modes_after and cb.records[-1].mode == "multi"
    assert abs(cb.records[-1].phi - phi_before) < 0.05  # φ returns to its pre-shock regime
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.6)

    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert len(lines) == step
    assert {"step", "loss", "phi", "mode", "lr", "event"} <= set(lines[0])
    assert [x["step"] for x in lines] == list(range(1, step + 1))
    summary = cb.summary()
    assert summary["restores"] == [restore["extra"]["restored_step"]]
    assert summary["steps_by_mode"]["mirror"] > 0


def test_controller_inside_trainer_restores_after_shock(tmp_path: Path, tiny_model_dir: Path) -> None:
    """End to end with transformers.Trainer. A random tiny GPT-2's loss stays near ln(V) whatever
    its LoRA weights, so the shock is injected as Unified LoRA describes it: at step 27 the LoRA
    weights are corrupted and, until the controller reacts, the logged loss is a 20x spike.
    The controller must enter mirror mode, put back a pre-shock snapshot (not the corrupted
    weights), lower the lr, and φ must come back below θ1 once the loss is normal again."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from training.data import Example
    from training.lm import LMDataset, PadCollator

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lcfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lcfg)
    texts = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 8
    ds = LMDataset([Example(t) for t in texts], tok, 32)
    cb = AdaptiveControllerCallback(
        tmp_path / "c.jsonl", ControllerConfig(snapshot_every=5, calibration_steps=5)
    )

    class Shock(TrainerCallback):
        active = False
        clean: dict[str, torch.Tensor] = {}
        corrupted: dict[str, torch.Tensor] = {}
        restored: dict[str, torch.Tensor] = {}

        def on_step_begin(self, args, state, control, model=None, **kw):
            if cb.records and cb.records[-1].event == "restore" and not self.restored:
                self.restored = {
                    n: p.detach().clone() for n, p in model.named_parameters() if n in self.clean
                }

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 27:
                lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
                self.clean = {n: p.detach().clone() for n, p in lora.items()}
                with torch.no_grad():
                    for p in lora.values():
                        p.add_(torch.randn_like(p) * 5.0)
                self.corrupted = {n: p.detach().clone() for n, p in lora.items()}
                self.active = True

        def on_log(self, args, state, control, logs=None, **kw):
            if cb.records and cb.records[-1].event == "restore":
                self.active = False
            if self.active and logs and "loss" in logs:
                logs["loss"] = float(logs["loss"]) * 20.0  # same dict object the controller reads next

    shock = Shock()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=90, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=50,
        lr_scheduler_type="constant",
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=ds, data_collator=PadCollator(tok.eos_token_id),
            callbacks=[shock, cb]).train()  # fmt: skip

    recs = cb.records
    assert len(recs) == 90  # the controller forced a log event every step
    assert all(r.mode != "mirror" for r in recs[:27])
    restores = [r for r in recs if r.event == "restore"]
    assert len(restores) == 1, [round(r.phi, 3) for r in recs]
    r = restores[0]
    assert r.step > 27 and r.extra["restored_step"] <= 25 and r.lr == pytest.approx(1e-3 * 0.2)
    name = next(iter(shock.clean))
    dist_clean = (shock.restored[name] - shock.clean[name]).abs().max()
    dist_corrupt = (shock.restored[name] - shock.corrupted[name]).abs().max()
    assert dist_clean < 0.1 * dist_corrupt  # the restored tensors are the healthy pre-shock ones
    assert recs[-1].mode != "mirror" and recs[-1].phi < 0.7  # φ recovered
    assert max(x.phi for x in recs) >= 0.7
