"""spaCy complexity features: ordering, ranges, tiers, and the parser-free fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from router_core import FEATURE_NAMES, ComplexityAnalyzer, complexity, count_syllables
from tests.conftest import ROUTING_EXTRA, require_spacy

SIMPLE = [
    "Name three colors.",
    "Say hello.",
    "Add two and two.",
]
COMPLEX = [
    "Explain why the Treaty of Versailles, which was signed in 1919 after the armistice that ended the "
    "First World War, is widely considered by historians to have contributed to the economic instability "
    "that allowed extremist movements to flourish in Germany during the following decades.",
    "Given that the function, which maps integers to reals, satisfies the property that its value at a sum "
    "equals the sum of its values whenever the arguments are coprime, determine whether it must be linear, "
    "and justify your answer by constructing a counterexample if it is not.",
    "Although the committee had originally intended to publish its findings before the election, the "
    "discovery that several of the documents it relied upon had been altered forced it to postpone the "
    "report until investigators could establish who had tampered with them.",
]


@pytest.fixture(scope="module")
def analyzer() -> ComplexityAnalyzer:
    require_spacy()
    a = ComplexityAnalyzer()
    if not a.parser:
        pytest.skip(f"spaCy's en_core_web_sm pipeline is not installed ({a.note}) {ROUTING_EXTRA}")
    return a


def test_simple_scores_below_complex(analyzer: ComplexityAnalyzer) -> None:
    reports = analyzer.analyze(SIMPLE + COMPLEX)
    simple, complex_ = reports[: len(SIMPLE)], reports[len(SIMPLE) :]
    assert max(r.score for r in simple) < min(r.score for r in complex_)
    assert all(r.tier == 0 for r in simple)
    assert all(r.tier == 2 for r in complex_)
    for r in reports:
        assert 0.0 <= r.score <= 1.0
        assert set(r.features) == set(FEATURE_NAMES)
        assert all(0.0 <= v <= 1.0 for v in r.features.values())
        assert r.vector.shape == (analyzer.feature_dim,)
        assert r.parser is True and r.note == ""
    # Syntax features themselves order the two groups.
    for name in ("dependency_depth", "clause_count", "sentence_length"):
        assert max(r.features[name] for r in simple) < min(r.features[name] for r in complex_), name


def test_medium_sits_between(analyzer: ComplexityAnalyzer) -> None:
    s, m, c = analyzer.analyze(
        [SIMPLE[0], "Write a function that returns the largest number in a list.", COMPLEX[0]]
    )
    assert s.score < m.score < c.score


def test_vectors_and_tiers(analyzer: ComplexityAnalyzer) -> None:
    v = analyzer.vectors(SIMPLE + COMPLEX)
    assert v.shape == (6, len(FEATURE_NAMES)) and v.dtype == torch.float32
    assert analyzer.vectors([]).shape == (0, len(FEATURE_NAMES))
    assert torch.allclose(analyzer.scores(SIMPLE), torch.tensor([r.score for r in analyzer.analyze(SIMPLE)]))
    assert [analyzer.tier(x) for x in (0.0, 0.29, 0.3, 0.69, 0.7, 1.0)] == [0, 0, 1, 1, 2, 2]
    empty = analyzer.analyze([""])[0]
    assert (empty.score, empty.tier) == (0.0, 0)
    assert empty.to_dict()["features"] == dict.fromkeys(FEATURE_NAMES, 0.0)


def test_custom_thresholds() -> None:
    spacy = require_spacy()
    a = ComplexityAnalyzer(spacy.blank("en"), thresholds=(0.0, 0.0))
    assert {r.tier for r in a.analyze(SIMPLE)} == {2}
    with pytest.raises(ValueError):
        ComplexityAnalyzer(spacy.blank("en"), thresholds=(0.8, 0.2))


def test_blank_pipeline_falls_back_and_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spacy = require_spacy()
    monkeypatch.setattr(complexity, "_warned", set())  # warn-once is per process; start afresh
    nlp = spacy.blank("en")
    with caplog.at_level(logging.WARNING, logger="router_core.complexity"):
        a = ComplexityAnalyzer(nlp)
    assert a.parser is False
    assert nlp.pipe_names == []  # the caller's pipeline is not modified
    reports = a.analyze(SIMPLE + COMPLEX)
    assert all(r.parser is False and "no parser" in r.note for r in reports)
    assert max(r.score for r in reports[:3]) < min(r.score for r in reports[3:])
    assert all(0.0 <= r.score <= 1.0 for r in reports)
    assert any("no parser" in rec.getMessage() for rec in caplog.records)


def test_unknown_pipeline_falls_back_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="router_core.complexity"):
        a = ComplexityAnalyzer("no_such_spacy_pipeline_xyz")
        ComplexityAnalyzer("no_such_spacy_pipeline_xyz")
    assert a.parser is False and "unavailable" in a.note
    warnings = [r for r in caplog.records if "no_such_spacy_pipeline_xyz" in r.getMessage()]
    assert len(warnings) == 1
    r = a.analyze(COMPLEX[:1])[0]
    assert r.parser is False and r.tier in (1, 2) and r.score > a.analyze(SIMPLE[:1])[0].score


@pytest.mark.parametrize(("word", "n"), [("cat", 1), ("make", 1), ("table", 2), ("beautiful", 3), ("42", 1)])
def test_syllables(word: str, n: int) -> None:
    assert count_syllables(word) == n
