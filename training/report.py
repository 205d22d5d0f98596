"""The evaluation report: ``report.json``, ``report.md`` and PNG plots (matplotlib, Agg).

Plots: one confusion matrix per router, grouped perplexity bars per domain (base, each
adapter, each routed mixture), and φ(t) with the controller's mode for every evaluated
adapter that was trained with the Unified LoRA controller (its ``controller.jsonl``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training.controller import read_controller_log  # noqa: E402
from training.store import CONTROLLER_LOG  # noqa: E402

log = logging.getLogger(__name__)


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def plot_confusion(path: Path, title: str, rows: list[str], cols: list[str], matrix: list[list[int]]) -> None:
    fig, ax = plt.subplots(figsize=(max(3.8, 1.6 + 0.9 * len(cols)), max(3.2, 1.4 + 0.7 * len(rows))))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("routed to (top-1)")
    ax.set_ylabel("domain")
    ax.set_title(title)
    top = max((v for r in matrix for v in r), default=0)
    for i, r in enumerate(matrix):
        for j, v in enumerate(r):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_perplexity(path: Path, ppl: dict[str, Any]) -> None:
    domains = list(ppl)
    series: list[tuple[str, list[float]]] = [("base", [ppl[d]["base"] for d in domains])]
    adapters = sorted({a for d in domains for a in ppl[d]["adapters"]})
    routers = sorted({r for d in domains for r in ppl[d]["routed"]})
    series += [(f"adapter {a}", [ppl[d]["adapters"].get(a, float("nan")) for d in domains]) for a in adapters]
    series += [(f"routed {r}", [ppl[d]["routed"].get(r, float("nan")) for d in domains]) for r in routers]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(domains), 4))
    for k, (label, values) in enumerate(series):
        ax.bar([i + k * width for i in range(len(domains))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))], domains)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title("Per-domain perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_phi(path: Path, name: str, records: list[dict[str, Any]]) -> None:
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["phi"] for r in records], label="φ(t)")
    ax.plot(steps, [r["stress"] for r in records], alpha=0.4, label="D (stress)")
    for y, label in ((0.3, "θ0"), (0.7, "θ1")):
        ax.axhline(y, ls="--", lw=0.8, color="grey")
        ax.text(steps[0] if steps else 0, y + 0.01, label, fontsize=7, color="grey")
    for r in records:
        if r.get("event") == "restore":
            ax.axvline(r["step"], color="red", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_title(f"Controller φ(t): {name} (red: mirror restore)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(path: Path, routing: dict[str, Any]) -> bool:
    """The held-out reliability diagram of every router (confidence = top weight vs how often
    the top is right, per bin; the diagonal is perfect calibration). False when there is none."""
    rows = {k: r["held_out"]["reliability"] for k, r in routing.items() if r.get("held_out", {}).get("reliability")}
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for key, bins in rows.items():
        ece = routing[key]["held_out"].get("ece", float("nan"))
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                label=f"{key} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top adapter's weight)")
    ax.set_ylabel("accuracy (top adapter right)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("Held-out reliability")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out: Path, folders: dict[str, Path]) -> None:
    """Render plots and the Markdown summary; ``report`` gets a ``plots`` list."""
    out.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    domains = list(report["domains"])
    for key, r in report["routing"].items():
        fname = f"confusion_{_slug(key)}.png"
        plot_confusion(
            out / fname, f"{key}: accuracy {r['accuracy']:.1%}", domains, r["adapters"], r["confusion"]
        )
        plots.append(fname)
    plot_perplexity(out / "perplexity.png", report["perplexity"])
    plots.append("perplexity.png")
    if plot_reliability(out / "reliability.png", report["routing"]):
        plots.append("reliability.png")
    controller: dict[str, Any] = {}
    for name, folder in folders.items():
        log_path = folder / CONTROLLER_LOG
        if log_path.is_file():
            records = read_controller_log(log_path)
            if records:
                fname = f"phi_{_slug(name)}.png"
                plot_phi(out / fname, name, records)
                plots.append(fname)
                controller[name] = {
                    "steps": len(records),
                    "final_phi": records[-1]["phi"],
                    "restores": [r["step"] for r in records if r.get("event") == "restore"],
                    "plot": fname,
                }
    report["controller"] = controller
    report["plots"] = plots
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    log.info("report written to %s", out)


def _vs_best(routed: float, best: float) -> str:
    return f"{routed:.2f} {'✓' if routed <= best else '✗'}"


def _side_by_side(report: dict[str, Any]) -> list[str]:
    """Every router's top-1 accuracy in-distribution (validation split) and on held-out sources."""
    rows = {k: r for k, r in report["routing"].items() if "held_out" in r}
    if not rows:
        return []
    held = next(iter(rows.values()))["held_out"]
    lines = ["", "## Routing accuracy: in-distribution vs held-out sources", "",
             "| router | in-distribution | held-out | " + " | ".join(f"held-out {d} (n={n})" for d, n in held["n"].items())
             + " | held-out ECE |", "|---|---|---|" + "---|" * (len(held["n"]) + 1)]
    for key, r in rows.items():
        per = " | ".join(f"{r['held_out']['per_domain_accuracy'][d]:.1%}" for d in held["n"])
        ece, raw = r["held_out"].get("ece"), r["held_out"].get("ece_uncalibrated")
        shown = "-" if ece is None else (f"{ece:.3f}" if raw is None or raw == ece else f"{raw:.3f} → {ece:.3f}")
        lines.append(f"| {key} | {r['accuracy']:.1%} | {r['held_out']['accuracy']:.1%} | {per} | {shown} |")
    lines.append("")
    lines.append("ECE a → b: without → with the router's confidence map (docs/routing.md).")
    return lines + _per_source(rows)


def _per_source(rows: dict[str, Any]) -> list[str]:
    """Held-out accuracy and ECE per source (the `source` of each held-out record), one column
    pair per router."""
    sources = {s: v["label"] for r in rows.values() for s, v in r["held_out"].get("per_source", {}).items()}
    if not sources:
        return []
    keys = list(rows)
    lines = ["", "## Held-out accuracy / ECE per source", "",
             "| source | label | n | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for src, label in sources.items():
        cells = []
        for k in keys:
            v = rows[k]["held_out"].get("per_source", {}).get(src)
            cells.append("–" if v is None else f"{v['accuracy']:.1%} / {v['ece']:.3f}")
        n = next(r["held_out"]["per_source"][src]["n"] for r in rows.values() if src in r["held_out"].get("per_source", {}))
        lines.append(f"| {src} | {label} | {n} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# Switchboard evaluation",
        "",
        f"Base model `{report['base_model']}`; re-routing every {cfg['reroute_every']} tokens; "
        f"split `{cfg['split']}`, up to {cfg['limit']} examples per domain; runtime {report['runtime_s']} s.",
        "",
        "## Routing accuracy",
        "",
        "| router | embedder | accuracy | " + " | ".join(report["domains"]) + " | complexity MSE |",
        "|---|---|---|" + "---|" * len(report["domains"]) + "---|",
    ]
    for key, r in report["routing"].items():
        per = " | ".join(f"{r['per_domain_accuracy'].get(d, 0):.1%}" for d in report["domains"])
        mse = f"{r['complexity_mse']:.4f}" if "complexity_mse" in r else "–"
        lines.append(f"| {key} | {r['embedder']} | {r['accuracy']:.1%} | {per} | {mse} |")
    lines += _side_by_side(report)
    lines += ["", "## Perplexity (held-out, lower is better)", ""]
    ppl = report["perplexity"]
    adapters = sorted({a for d in ppl for a in ppl[d]["adapters"]})
    routers = sorted({r for d in ppl for r in ppl[d]["routed"]})
    header = ["domain", "n", "base"] + [f"adapter {a}" for a in adapters] + ["best single"]
    header += [f"routed {r}" for r in routers]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for d, e in ppl.items():
        best = min(e["adapters"].values(), default=float("nan"))
        cells = [d, str(report["domains"][d]["n_examples"]), f"{e['base']:.2f}"]
        cells += [f"{e['adapters'].get(a, float('nan')):.2f}" for a in adapters] + [f"{best:.2f}"]
        cells += [_vs_best(e["routed"].get(r, float("nan")), best) for r in routers]
        lines.append("| " + " | ".join(cells) + " |")
    temps = {k: r["temperature"] for k, r in report["routing"].items() if "temperature" in r}
    if temps:
        lines += ["", "Centroid temperatures: " + ", ".join(f"{k} {t:g}" for k, t in temps.items())
                  + " (`centroid` is fitted on the adapters' examples, leave-one-out, as the server does). "
                  "✓ = routed perplexity ≤ the best single adapter's."]
    margins = {k: r["switch_margin"] for k, r in report["routing"].items() if "switch_margin" in r}
    if margins:
        lines += ["", "Centroid switch margins: " + ", ".join(f"{k} {m:.3f}" for k, m in margins.items())
                  + " (score a re-route's new top adapter must win by; `centroid`'s is half the examples' "
                  "median leave-one-out margin, as the server fits it; 0 = off)."]
    lines += ["", "Mean top-1 switches per example while re-routing:", ""]
    for key, r in report["routing"].items():
        if "mean_top1_switches" in r:  # Arrow re-decides every token in every layer: no re-routes to count
            stats = ", ".join(f"{d}: {v:.2f}" for d, v in r["mean_top1_switches"].items())
            lines.append(f"- {key}: {stats}")
    if report.get("controller"):
        lines += ["", "## Adaptive controller (Unified LoRA)", ""]
        for name, c in report["controller"].items():
            lines.append(
                f"- {name}: {c['steps']} steps, final φ {c['final_phi']:.3f}, mirror restores at {c['restores']}"
            )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)
