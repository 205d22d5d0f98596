"""Form beside topic: is a text a code body, a request for code, or prose?

The sentence encoder behind the centroid router matches *topic*: prose about software (the Zen
of Python, licence paragraphs, quips about computers) scores as `code`. A two-way form head
fitted on code-vs-literature examples cannot fix that, because a code adapter's routing texts
are *requests* ("Write a Python function `f`. Return ..."), which have the form of prose
(docs/routing.md, "Topic and form together"). This head has three classes, so prose about
software can be told from both a request and code:

* **code** — code bodies (the starter data's CPython functions and pasted snippets),
* **request** — asks for code (imperatives and questions, often with a signature in backticks),
* **prose** — narrative and expository text, verse, aphorisms, dialogue.

Its features are blind to topic and to length: shares of spaCy's universal POS tags, the mood
of the sentences (imperative = a root tagged VB with no subject and no auxiliary; questions;
sentences with a subject; quotations), the first sentence's mood, pronouns of the first and
second person, and code characters. Sentence length is left out on purpose: short requests and
short aphorisms share it. A standardised multinomial logistic regression
(`router_core.form_head_weights`, fitted by `scripts/fit_form_head.py` on the starter data's
training split only) turns them into probabilities.

`FormReader.read` needs an already-loaded spaCy `Language` (the catalogue loads it at start,
beside the embedder): nothing here touches files.

Combination with the topic score (`form_log_likelihood`, used by `CentroidRouter.route`): a
product of experts. Each adapter has a *form group* — the majority form of its own examples
(`adapter_form`): `prose` for a literature adapter, `request` or `code` for a code adapter.
The form's likelihood of adapter a is P(prose | text) for a prose adapter, P(code) + P(request)
for any other, and the router adds `T · log` of it to a's score, T being its fitted temperature,
so softmax(score / T) becomes the topic's calibrated softmax times the form's probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

FORMS: tuple[str, ...] = ("code", "request", "prose")
PROSE = FORMS.index("prose")

_UPOS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
         "PUNCT", "SCONJ", "SYM", "VERB", "X")
FEATURE_NAMES: tuple[str, ...] = (
    *(f"pos_{p}" for p in _UPOS), "imperative", "question", "declarative", "period_end", "second_person",
    "first_person", "backtick", "code_chars", "digits", "indented", "code_line_end", "identifier",
    "first_imperative", "first_question", "quoted",
)
_SUBJECTS = {"nsubj", "nsubjpass", "expl", "csubj", "csubjpass"}
_SECOND = {"you", "your", "yours", "yourself", "yourselves"}
_FIRST = {"i", "me", "my", "mine", "we", "us", "our", "ours"}
_CODE_CHARS = set("{}[]();=<>$#_\\|&*/+%@^~`")
_QUOTES = {'"', "“", "”", "‘", "’", "'"}
_CODE_ENDS = tuple(";{}):,\\([")
_FLOOR = 1e-12  # a form probability is never taken as exactly 0 (its log would veto any topic)


def form_features(doc: Any) -> list[float]:
    """The features (`FEATURE_NAMES`) of one parsed text (a spaCy `Doc` with tags, a dependency
    parse and sentences): rates, so a text's length does not enter."""
    toks = [t for t in doc if not t.is_space]
    n = max(len(toks), 1)
    pos = [sum(t.pos_ == p for t in toks) / n for p in _UPOS]
    sents = [s for s in doc.sents if any(not t.is_space for t in s)]
    ns = max(len(sents), 1)
    imperative = question = declarative = period = quoted = 0
    first_imperative = first_question = 0.0
    for j, sent in enumerate(sents):
        root = sent.root
        has_subject = any(c.dep_ in _SUBJECTS for c in root.children)
        is_imperative = root.tag_ == "VB" and not has_subject and not any(c.dep_ == "aux" for c in root.children)
        last = [t for t in sent if not t.is_space][-1].text
        imperative += is_imperative
        declarative += has_subject
        question += last == "?"
        period += last in (".", "!", '"', "”", "'")
        quoted += any(t.text in _QUOTES for t in sent)
        if j == 0:
            first_imperative, first_question = float(is_imperative), float(last == "?")
    words = [t.lower_ for t in toks if t.is_alpha]
    nw = max(len(words), 1)
    text = doc.text
    chars = [c for c in text if not c.isspace()]
    nc = max(len(chars), 1)
    lines = [line for line in text.splitlines() if line.strip()]
    nl = max(len(lines), 1)
    identifiers = sum(1 for t in toks if ("_" in t.text and t.text.strip("_"))
                      or (any(c.isupper() for c in t.text[1:]) and any(c.islower() for c in t.text))
                      or t.text.endswith("()"))
    return [*pos, imperative / ns, question / ns, declarative / ns, period / ns,
            sum(w in _SECOND for w in words) / nw, sum(w in _FIRST for w in words) / nw,
            text.count("`") / nc, sum(c in _CODE_CHARS for c in chars) / nc, sum(c.isdigit() for c in chars) / nc,
            sum(line[:1] in (" ", "\t") for line in lines) / nl,
            sum(line.rstrip().endswith(_CODE_ENDS) for line in lines) / nl,
            identifiers / n, first_imperative, first_question, quoted / ns]


def text_features(nlp: Any, texts: Sequence[str], max_chars: int = 2000, batch_size: int = 32) -> Tensor:
    """`form_features` of each text's last `max_chars` characters through `nlp`, `[B, F]` (float64)."""
    if not texts:
        return torch.zeros(0, len(FEATURE_NAMES), dtype=torch.float64)
    clipped = [t[-max_chars:] for t in texts]
    return torch.tensor([form_features(d) for d in nlp.pipe(clipped, batch_size=batch_size)],
                        dtype=torch.float64)  # [B, F]


@dataclass(frozen=True)
class FormHead:
    """Standardise, then a multinomial logistic regression over `FORMS`."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[tuple[float, ...], ...]  # [len(FORMS)][len(FEATURE_NAMES)]
    intercept: tuple[float, ...]
    max_chars: int = 2000  # each text's last characters the head was fitted on (and reads)

    def probs(self, features: Tensor) -> Tensor:
        """P(form | text) `[B, 3]` (float32) from `[B, len(FEATURE_NAMES)]` features."""
        x = (features.double() - torch.tensor(self.mean, dtype=torch.float64)) \
            / torch.tensor(self.scale, dtype=torch.float64)  # [B, F]
        logits = x @ torch.tensor(self.coef, dtype=torch.float64).T + torch.tensor(self.intercept, dtype=torch.float64)
        return torch.softmax(logits, dim=-1).float()  # [B, 3]


def default_head() -> FormHead:
    """The head shipped in `router_core.form_head_weights` (see `scripts/fit_form_head.py`)."""
    import router_core.form_head_weights as w

    if w.FEATURES != FEATURE_NAMES or w.FORMS != FORMS:
        raise ValueError("router_core/form_head_weights.py was fitted on other features: rerun scripts/fit_form_head.py")
    return FormHead(w.MEAN, w.SCALE, w.COEF, w.INTERCEPT, w.MAX_CHARS)


class FormReader:
    """P(form | text) for texts, through a loaded spaCy pipeline (it needs a tagger and a
    parser, as `en_core_web_sm` has). Long texts keep their last `max_chars` characters (by
    default the head's own cap), the newest text, as the sentence encoder keeps its newest
    tokens: the parse's cost grows with the text, and it runs on the engine thread."""

    def __init__(self, nlp: Any, head: FormHead | None = None, *, max_chars: int | None = None,
                 batch_size: int = 32) -> None:
        missing = {"tagger", "parser"} - set(nlp.pipe_names)
        if missing:
            raise ValueError(f"the form head needs a spaCy pipeline with {sorted(missing)}")
        self.nlp, self.head = nlp, head or default_head()
        self.max_chars, self.batch_size = max_chars or self.head.max_chars, batch_size

    def features(self, texts: Sequence[str]) -> Tensor:
        """`[B, len(FEATURE_NAMES)]` (float64)."""
        return text_features(self.nlp, texts, self.max_chars, self.batch_size)

    def read(self, texts: Sequence[str]) -> Tensor:
        """P(form | text) `[B, 3]` over `FORMS`."""
        return self.head.probs(self.features(texts))  # [B, 3]


def adapter_form(example_probs: Tensor) -> str:
    """An adapter's form group: the form most of its examples `[m, 3]` are read as."""
    if example_probs.dim() != 2 or example_probs.shape[0] == 0:
        raise ValueError(f"need [m, 3] example form probabilities, got {tuple(example_probs.shape)}")
    return FORMS[int(torch.bincount(example_probs.argmax(1), minlength=len(FORMS)).argmax())]


def form_log_likelihood(text_probs: Tensor, groups: Sequence[str]) -> Tensor:
    """log P(the text's form is adapter a's) `[B, n]`: P(prose) for an adapter whose examples are
    prose, P(code) + P(request) for any other. `text_probs` `[B, 3]` over `FORMS`."""
    unknown = set(groups) - set(FORMS)
    if unknown:
        raise ValueError(f"unknown form groups {sorted(unknown)}; expected {FORMS}")
    prose = text_probs[:, PROSE].float()  # [B]
    is_prose = torch.tensor([g == "prose" for g in groups], device=text_probs.device)  # [n]
    m = torch.where(is_prose[None, :], prose[:, None], 1.0 - prose[:, None])  # [B, n]
    return m.clamp(min=_FLOOR).log()

