"""The PNG plots of one run's results: throughput against concurrency, latency CDFs, decode
speed against HF `generate` (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from bench.decode import METHODS


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    s, d = results.get("serving"), results.get("decode")
    if s and s.get("levels"):
        levels = [(int(c), x) for c, x in s["levels"].items() if x.get("tokens")]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([c for c, _ in levels], [x["agg_tok_s"] for _, x in levels], "o-", label="Switchboard HTTP (mixed adapters)")
        if s.get("peft_mixed8_tok_s"):
            ax.axhline(s["peft_mixed8_tok_s"], color="C1", ls="--", label="PEFT mixed batch of 8 (in-process)")
        if d and d.get("b8"):
            ax.axhline(d["b8"]["hf_generate"]["tok_s"], color="C2", ls=":", label="HF generate batch 8 (no adapter)")
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel("aggregate tokens / s")
        ax.set_xticks([c for c, _ in levels])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Throughput vs concurrency")
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_concurrency.png", dpi=120)
        plt.close(fig)
        written.append("throughput_vs_concurrency.png")

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for c, x in levels:
            for ax, key in zip(axes, ("itl_ms", "ttft_ms"), strict=True):
                xs = [max(v, 1e-3) for v in sorted(x["samples"][key])]
                if xs:
                    ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], drawstyle="steps-post",
                            marker="o" if len(xs) < 20 else None, ms=3, label=f"{c} client{'s' if c > 1 else ''}")
        for ax, title in zip(axes, ("inter-token latency", "time to first token"), strict=True):
            ax.set_xscale("log")
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("ms (log scale)")
            ax.set_ylabel("fraction ≤ x")
            ax.set_title(f"CDF: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "latency_cdf.png", dpi=120)
        plt.close(fig)
        written.append("latency_cdf.png")
    if d:
        batches = [b for b in (1, 8) if d.get(f"b{b}")]
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / max(len(batches), 1)
        for j, b in enumerate(batches):
            hf = d[f"b{b}"]["hf_generate"]["tok_s"]
            vals = [d[f"b{b}"][m]["tok_s"] / hf for m in METHODS]
            ax.bar([i + j * width for i in range(len(METHODS))], vals, width, label=f"batch {b}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(METHODS))])
        ax.set_xticklabels([m.replace("_", "\n") for m in METHODS], fontsize=8)
        ax.set_ylabel("tok/s ÷ HF generate (same batch)")
        ax.set_title("Decode speed relative to HF generate")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "decode_vs_hf.png", dpi=120)
        plt.close(fig)
        written.append("decode_vs_hf.png")
    return written
