"""``switchboard-train adapter``: one PEFT LoRA adapter, trained with ``transformers.Trainer``.

The Trainer (not a hand-written loop) is what lets the same command run under
``torchrun`` / ``accelerate launch`` on several GPUs, resume from its checkpoints, and
take callbacks such as the Unified LoRA controller. Checkpoints live in the store's
``.work/<name>/checkpoints`` scratch folder; the adapter folder itself only ever holds
the final PEFT files (safetensors), metadata, a prompt sample and centroids.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from router_core.store_rules import base_fingerprint
from training import data as data_mod
from training.controller import AdaptiveControllerCallback, ControllerConfig
from training.embedding import embed, make_embedder
from training.lm import LMDataset, PadCollator, default_max_length, mean_token_nll, perplexity
from training.store import (
    CENTROID_FILE,
    CONTROLLER_LOG,
    EXAMPLES_FILE,
    META_FILE,
    TrainingError,
    check_name,
    load_base,
    next_version,
    now_iso,
    pick_device,
    staged_folder,
    work_dir,
    write_json,
)

log = logging.getLogger(__name__)


@dataclass
class AdapterConfig:
    """Everything ``switchboard-train adapter`` takes; defaults are complexity-aware MoLoRA's where it has one."""

    base_model: str
    adapter_dir: Path
    data: str
    name: str
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("c_attn", "c_proj")
    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    embedder: str = "base"
    centroid_k: int = 1
    controller: bool = False
    max_length: int | None = None
    limit: int | None = None
    val_fraction: float = 0.1
    loss_on: str = "all"
    device: str = "auto"
    resume: bool = False
    save_steps: int = 100
    logging_steps: int = 10
    warmup_steps: int = 0
    description: str = ""
    domain: str | None = None
    examples_keep: int = 256
    progress: bool = True
    controller_config: ControllerConfig = field(default_factory=ControllerConfig)


def uses_conv1d(model: torch.nn.Module, targets: tuple[str, ...]) -> bool:
    """GPT-2's ``Conv1D`` stores ``[in, out]`` weights, so PEFT needs ``fan_in_fan_out=True``."""
    return any(
        type(m).__name__ == "Conv1D" and name.rsplit(".", 1)[-1] in targets
        for name, m in model.named_modules()
    )


def lora_config(cfg: AdapterConfig, model: torch.nn.Module) -> LoraConfig:
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        fan_in_fan_out=uses_conv1d(model, cfg.target_modules),
        task_type="CAUSAL_LM",
    )


def training_args(
    cfg: AdapterConfig, output_dir: Path, device: torch.device, logging_steps: int
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else -1,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        logging_steps=logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to="none",
        seed=cfg.seed,
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        eval_strategy="no",
    )


def _has_checkpoint(output_dir: Path) -> bool:
    return output_dir.is_dir() and any(p.name.startswith("checkpoint-") for p in output_dir.iterdir())


def train_adapter(
    cfg: AdapterConfig,
    dataset: data_mod.Dataset | None = None,
    extra_training: dict[str, Any] | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> dict[str, Any]:
    """Train one adapter and publish ``<adapter_dir>/<name>/``; returns its ``switchboard.json``.

    ``callbacks`` go to the Trainer as well (``switchboard demo`` drives one progress bar over
    several adapters with one)."""
    check_name(cfg.name)
    t0 = time.time()
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    ds = dataset or data_mod.load_dataset(
        cfg.data, limit=cfg.limit, val_fraction=cfg.val_fraction, seed=cfg.seed
    )
    if not ds.train:
        raise TrainingError(f"{cfg.data}: no training examples after the split")
    model, tokenizer = load_base(cfg.base_model, device)
    fingerprint = base_fingerprint(model)
    max_length = default_max_length(model, cfg.max_length)
    train_set = LMDataset(ds.train, tokenizer, max_length, cfg.loss_on)
    val_set = LMDataset(ds.validation, tokenizer, max_length, cfg.loss_on)
    pad_id = tokenizer.pad_token_id
    val_loss_base = mean_token_nll(model, val_set, pad_id) if len(val_set) else None

    try:
        peft_model = get_peft_model(model, lora_config(cfg, model))
    except ValueError as exc:
        raise TrainingError(f"--target-modules {','.join(cfg.target_modules)}: {exc}") from exc
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info(
        "LoRA r=%d alpha=%d on %s: %d trainable parameters",
        cfg.rank,
        cfg.alpha,
        cfg.target_modules,
        n_trainable,
    )

    scratch = work_dir(cfg.adapter_dir, cfg.name)
    output_dir = scratch / "checkpoints"
    if not cfg.resume and output_dir.exists():
        shutil.rmtree(output_dir)
    callbacks = list(callbacks or [])
    controller_cb = None
    if cfg.controller:
        ctl_log = scratch / CONTROLLER_LOG
        if not cfg.resume and ctl_log.exists():
            ctl_log.unlink()
        controller_cb = AdaptiveControllerCallback(ctl_log, cfg.controller_config)
        callbacks.append(controller_cb)
    logging_steps = 1 if cfg.controller else cfg.logging_steps
    trainer = Trainer(
        model=peft_model,
        args=training_args(cfg, output_dir, device, logging_steps),
        train_dataset=train_set,
        data_collator=PadCollator(pad_id),
        callbacks=callbacks,
    )
    if not cfg.progress:
        trainer.remove_callback(PrinterCallback)  # --quiet: no per-step dicts on stdout either
    resume = bool(cfg.resume and _has_checkpoint(output_dir))
    if cfg.resume and not resume:
        log.info("--resume: no checkpoint in %s, starting from scratch", output_dir)
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if not trainer.is_world_process_zero():
        return {"name": cfg.name, "rank": "non-zero"}  # under torchrun only rank 0 evaluates and publishes
    val_loss = mean_token_nll(peft_model, val_set, pad_id) if len(val_set) else None

    with peft_model.disable_adapter():
        embedder = make_embedder(cfg.embedder, peft_model.base_model.model, tokenizer, device)
        prompts = [ex.routing_text for ex in ds.train[:2048]]
        centroids = _fit(embed(embedder, prompts), cfg.centroid_k, cfg.seed)

    meta: dict[str, Any] = {
        "name": cfg.name,
        "version": next_version(cfg.adapter_dir, cfg.name),
        "description": cfg.description or f"LoRA r={cfg.rank} trained on {data_mod.resolve_data_path(cfg.data).name}",
        "domain": cfg.domain or data_mod.resolve_data_path(cfg.data).stem,
        "base_model": cfg.base_model,
        "base_fingerprint": fingerprint,
        "created": now_iso(),
        "training": {
            "data": ds.sources,
            "data_hash": ds.data_hash(),
            "n_train": len(train_set),
            "n_validation": len(val_set),
            "limit": cfg.limit,
            "val_fraction": cfg.val_fraction,
            "template": ds.template,
            "loss_on": cfg.loss_on,
            "max_length": max_length,
            "lora": {
                "r": cfg.rank,
                "alpha": cfg.alpha,
                "dropout": cfg.dropout,
                "target_modules": list(cfg.target_modules),
            },
            "epochs": cfg.epochs,
            "max_steps": cfg.max_steps,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "seed": cfg.seed,
            "device": device.type,
            "steps": trainer.state.global_step,
            "resumed": resume,
            "trainable_params": n_trainable,
            "train_loss": float(result.training_loss),
            "train_loss_last": losses[-1] if losses else None,
            "val_loss": val_loss,
            "runtime_s": round(time.time() - t0, 2),
            **(extra_training or {}),
        },
        "eval": {
            "val_loss_base": val_loss_base,
            "val_loss_adapter": val_loss,
            "val_ppl_base": perplexity(val_loss_base) if val_loss_base is not None else None,
            "val_ppl_adapter": perplexity(val_loss) if val_loss is not None else None,
        },
        "centroids": {"embedder": embedder.id, "k": int(centroids.shape[0]), "n_examples": len(prompts)},
    }
    if controller_cb is not None:
        meta["training"]["controller"] = controller_cb.summary()
    publish_adapter(
        cfg.adapter_dir,
        cfg.name,
        peft_model,
        meta,
        ds.train,
        centroids,
        embedder.id,
        cfg.examples_keep,
        controller_log=controller_cb.log_path if controller_cb else None,
    )
    log.info(
        "adapter %s: val loss %.4f (base %.4f) in %.1fs",
        cfg.name,
        val_loss or float("nan"),
        val_loss_base or float("nan"),
        time.time() - t0,
    )
    return meta


def _fit(embeddings: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    from router_core.centroid import fit_centroids

    return fit_centroids(embeddings, k=k, seed=seed)


def publish_adapter(
    store: Path,
    name: str,
    peft_model: PeftModel,
    meta: dict[str, Any],
    examples: list[data_mod.Example],
    centroids: torch.Tensor,
    embedder_id: str,
    examples_keep: int = 256,
    controller_log: Path | None = None,
) -> Path:
    """Write the adapter folder atomically: PEFT files, metadata, prompt sample, centroids."""
    from router_core.artifacts import save_centroids

    with staged_folder(store, name) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        for stray in tmp.glob("*.bin"):
            stray.unlink()
        meta.setdefault("training", {})["examples_kept"] = data_mod.write_examples(
            tmp / EXAMPLES_FILE, examples, examples_keep
        )
        save_centroids(tmp / CENTROID_FILE, centroids, embedder_id)
        if controller_log is not None and controller_log.is_file():
            shutil.copyfile(controller_log, tmp / CONTROLLER_LOG)
        write_json(tmp / META_FILE, meta)
    return store / name


def config_dict(cfg: AdapterConfig) -> dict[str, Any]:
    """The config as plain JSON values (for logs and the experts summary)."""
    out = asdict(cfg)
    out["adapter_dir"] = str(cfg.adapter_dir)
    return out
