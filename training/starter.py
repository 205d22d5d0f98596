"""Starter adapters: code, prose and math LoRAs trained on the data shipped in the package.

``switchboard demo`` calls :func:`train_starters` when the store has nothing ``auto`` can route
over, so a fresh install reaches a routed completion without finding data first. It is the
ordinary ``switchboard-train adapter`` path (``transformers.Trainer``, the same store layout,
centroids and ``examples.jsonl``) with a budget sized for a CPU: on 2 cores the full budget
trains the 124M ``gpt2`` in the time the README states, ``quick`` in a fraction of it.

One progress bar covers every adapter. Its estimate is the average time per step so far
(``smoothing=0``), including the evaluation and centroid passes between adapters, so it is the
remaining wall-clock time, not the optimiser's alone.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from training.data import STARTER_PREFIX, starter_names

log = logging.getLogger(__name__)

STARTERS: dict[str, str] = {
    "code": "Python functions (CPython standard library, PSF License)",
    "prose": "public-domain novels (Project Gutenberg)",
    "math": "grade-school word problems with worked answers (GSM8K, MIT License)",
}


@dataclass(frozen=True)
class StarterBudget:
    """How much each starter adapter trains. ``steps`` optimiser steps of ``batch_size`` sequences
    of at most ``max_length`` tokens; ``limit`` examples are read (10 % of them validate)."""

    steps: int
    batch_size: int
    max_length: int
    limit: int
    rank: int = 8
    alpha: int = 16
    lr: float = 1e-3


FULL = StarterBudget(steps=25, batch_size=8, max_length=128, limit=240)
QUICK = StarterBudget(steps=8, batch_size=4, max_length=64, limit=64)


class _StepBar(TrainerCallback):
    """Advances the shared bar by one per optimiser step."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 (Trainer's signature)
        self.bar.update(1)


def train_starters(
    store: Path,
    base_model: str,
    *,
    names: list[str] | None = None,
    quick: bool = False,
    device: str = "auto",
    embedder: str = "base",
    seed: int = 0,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Train the starter adapters ``names`` (default all) into ``store``; returns their metadata."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from training.adapter import AdapterConfig, train_adapter

    names = names or list(STARTERS)
    unknown = sorted(set(names) - set(starter_names()))
    if unknown:
        raise ValueError(f"no starter data for {unknown}; shipped: {starter_names()}")
    budget = QUICK if quick else FULL
    say(f"Training {len(names)} starter adapters ({', '.join(names)}) on {base_model}: "
        f"{budget.steps} steps of {budget.batch_size} x {budget.max_length} tokens each"
        f"{' (--quick)' if quick else ''}. The estimate settles after the first adapter.")
    bar = tqdm(total=budget.steps * len(names), unit="step", desc="starter adapters", smoothing=0,
               disable=not progress, dynamic_ncols=True)
    hf_logging.disable_progress_bar()  # one bar: not transformers' own per weight load
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    quiet = logging.getLogger("training")
    level = quiet.level
    if progress:
        quiet.setLevel(logging.WARNING)  # per-adapter summaries below replace the INFO lines
    try:
        for name in names:
            bar.set_postfix_str(name)
            cfg = AdapterConfig(
                base_model=base_model, adapter_dir=store, data=STARTER_PREFIX + name, name=name,
                rank=budget.rank, alpha=budget.alpha, max_steps=budget.steps, lr=budget.lr,
                batch_size=budget.batch_size, max_length=budget.max_length, limit=budget.limit,
                warmup_steps=max(1, budget.steps // 10), seed=seed, device=device, embedder=embedder,
                save_steps=10**9, logging_steps=max(1, budget.steps // 3), progress=False,
                description=f"starter adapter: {STARTERS.get(name, name)}", domain=name,
            )  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices
                meta = train_adapter(cfg, callbacks=[_StepBar(bar)])
            results[name] = meta
            ev = meta["eval"]
            bar.write(f"  {name}: {meta['training']['steps']} steps in {meta['training']['runtime_s']:.0f} s, "
                      f"validation perplexity {_fmt(ev['val_ppl_base'])} -> {_fmt(ev['val_ppl_adapter'])}")
    finally:
        bar.close()
        quiet.setLevel(level)
    say(f"Starter adapters trained in {time.perf_counter() - t0:.0f} s -> {store}")
    return results


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"
