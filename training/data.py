"""Dataset loading for adapter and router training.

Three on-disk formats are accepted, because they are what public instruction and
corpus data ship as:

* Alpaca-style JSON array or JSONL with ``instruction`` / ``input`` / ``output``
  (``response`` is accepted for ``output``; GSM8K's ``question`` / ``answer`` map onto
  ``instruction`` / ``output``);
* ``{"text": ...}`` JSONL (one passage per record);
* plain text (``.txt``): a Project Gutenberg header and footer are stripped, the UTF-8
  BOM and CRLF line ends are normalised, and the text is cut into passages.

Every record becomes an :class:`Example`: the language model is trained on ``prompt +
completion``, routers and centroids embed ``routing_text`` (the user's own words). The template
that builds the prompt is recorded in the adapter's ``switchboard.json`` so the server
(or a user) can format requests the way the adapter was trained.

The train/validation split is hash based: an example lands in validation when the
sha256 of its text falls under ``val_fraction``. That keeps the split stable when the
file order changes or a different ``limit`` is used, which a seeded shuffle would not.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from training.text import chunk_passages, read_text, strip_gutenberg

log = logging.getLogger(__name__)

ALPACA_TEMPLATE = {
    "name": "alpaca",
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}
PLAIN_TEMPLATE = {"name": "plain", "prompt": "{text}"}
TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "plain": PLAIN_TEMPLATE}

DATA_SUFFIXES = (".json", ".jsonl", ".txt")
STARTER_DIR = Path(__file__).with_name("starter_data")  # package data: see its README.md


class DataError(ValueError):
    """A data file is missing, empty or in a format this loader does not know."""


@dataclass(frozen=True)
class Example:
    """One training record: the LM learns ``prompt + completion``.

    ``query`` is the user's own text (instruction and input, without the template's
    boilerplate): routers and centroids embed it, because a template shared by every data
    set would dominate a mean-pooled embedding and make all centroids look alike. Plain-text
    passages have no separate query; :attr:`routing_text` then falls back to the prompt.
    """

    prompt: str
    completion: str = ""
    source: str = ""
    query: str = ""

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    @property
    def routing_text(self) -> str:
        return self.query or self.prompt

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Dataset:
    """Examples plus what is needed to describe them in ``switchboard.json``."""

    train: list[Example]
    validation: list[Example]
    template: dict[str, str]
    sources: list[str]

    @property
    def all(self) -> list[Example]:
        return self.train + self.validation

    def data_hash(self) -> str:
        """sha256 over the exact texts used (train then validation), so a rerun is comparable."""
        h = hashlib.sha256()
        for split, items in (("train", self.train), ("validation", self.validation)):
            for ex in items:
                h.update(split.encode())
                h.update(b"\0")
                h.update(ex.text.encode("utf-8"))
                h.update(b"\0")
        return h.hexdigest()


# ---------------------------------------------------------------- record formats


def format_record(record: dict, template: dict[str, str] = ALPACA_TEMPLATE) -> Example:
    """Turn one JSON record (Alpaca, GSM8K or ``{"text"}``) into an :class:`Example`."""
    if "text" in record and "instruction" not in record and "question" not in record:
        return Example(prompt=str(record["text"]))
    instruction = record.get("instruction", record.get("question"))
    output = record.get("output", record.get("response", record.get("answer")))
    if instruction is None or output is None:
        raise DataError(f"record has neither instruction/output, question/answer nor text: {sorted(record)}")
    instruction = str(instruction).strip()
    extra = str(record.get("input") or "").strip()
    if extra:
        prompt = template["prompt_input"].format(instruction=instruction, input=extra)
    else:
        prompt = template["prompt_no_input"].format(instruction=instruction)
    query = f"{instruction}\n{extra}" if extra else instruction
    return Example(prompt=prompt, completion=str(output).strip(), query=query)


def _read_json_records(path: Path) -> list[dict]:
    text = read_text(path).strip()
    if not text:
        return []
    if path.suffix == ".json" and text.startswith("["):
        data = json.loads(text)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records")
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
    return records


def load_file(path: Path, chunk_chars: int = 1000) -> tuple[list[Example], dict[str, str]]:
    """Load one file; returns its examples and the template they were formatted with."""
    if path.suffix in (".json", ".jsonl"):
        records = _read_json_records(path)
        examples = []
        for rec in records:
            if not isinstance(rec, dict):
                raise DataError(f"{path}: every record must be a JSON object")
            examples.append(format_record(rec))
        template = PLAIN_TEMPLATE if examples and not examples[0].completion else ALPACA_TEMPLATE
        examples = [Example(e.prompt, e.completion, source=path.name, query=e.query) for e in examples]
        return examples, template
    text = read_text(path)
    body, is_gutenberg = strip_gutenberg(text)
    passages = chunk_passages(body, chunk_chars=chunk_chars, unwrap=is_gutenberg)
    return [Example(prompt=p, source=path.name) for p in passages], PLAIN_TEMPLATE


STARTER_PREFIX = "starter:"


def starter_names() -> list[str]:
    """The data sets shipped in the package (``training/starter_data/<name>.jsonl``)."""
    return sorted(p.stem for p in STARTER_DIR.glob("*.jsonl"))


def resolve_data_path(path: str | Path) -> Path:
    """``starter:NAME`` names a data set shipped in the package; anything else is a path."""
    text = str(path)
    if not text.startswith(STARTER_PREFIX):
        return Path(path)
    name = text[len(STARTER_PREFIX) :]
    if name not in starter_names():
        raise DataError(f"unknown starter data set {text!r}; choose one of: "
                        + ", ".join(STARTER_PREFIX + n for n in starter_names()))
    return STARTER_DIR / f"{name}.jsonl"


def data_files(path: Path) -> list[Path]:
    """A file, or every ``.json``/``.jsonl``/``.txt`` file in a folder (sorted, non-recursive)."""
    path = resolve_data_path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: no {', '.join(DATA_SUFFIXES)} files in this folder")
        return files
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return [path]


def load_examples(
    path: str | Path, limit: int | None = None, chunk_chars: int = 1000
) -> tuple[list[Example], dict]:
    """Load every example under ``path`` (file or folder), keeping the first ``limit``.

    With a folder, the limit is shared round-robin between its files so that, e.g., a
    slice of the Gutenberg folder holds passages from every book, not only the first.
    """
    files = data_files(resolve_data_path(path))
    per_file: list[list[Example]] = []
    template: dict | None = None
    for f in files:
        examples, tmpl = load_file(f, chunk_chars=chunk_chars)
        if template is not None and tmpl["name"] != template["name"]:
            raise DataError(
                f"{f}: mixes {tmpl['name']} records with {template['name']} records in one data set"
            )
        template = tmpl
        per_file.append(examples)
    merged = list(_round_robin(per_file)) if len(per_file) > 1 else per_file[0]
    if limit is not None:
        merged = merged[:limit]
    if not merged:
        raise DataError(f"{path}: no examples found")
    assert template is not None
    return merged, template


def _round_robin(lists: Sequence[list[Example]]) -> Iterable[Example]:
    longest = max(len(x) for x in lists)
    for i in range(longest):
        for items in lists:
            if i < len(items):
                yield items[i]


def _hash_fraction(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_examples(
    examples: Sequence[Example], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Hash-based split; guarantees at least one example on each side when there are two."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    scores = [_hash_fraction(ex.text, seed) for ex in examples]
    train = [ex for ex, s in zip(examples, scores, strict=True) if s >= val_fraction]
    val = [ex for ex, s in zip(examples, scores, strict=True) if s < val_fraction]
    if val_fraction > 0 and not val and len(examples) >= 2:
        i = min(range(len(examples)), key=scores.__getitem__)
        val = [examples[i]]
        train = [ex for j, ex in enumerate(examples) if j != i]
    elif not train and len(examples) >= 2:
        i = max(range(len(examples)), key=scores.__getitem__)
        train = [examples[i]]
        val = [ex for j, ex in enumerate(examples) if j != i]
    return train, val


def load_dataset(
    path: str | Path,
    limit: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    chunk_chars: int = 1000,
) -> Dataset:
    """Load, slice and split a data set in one call (what the CLI sub-commands use)."""
    examples, template = load_examples(path, limit=limit, chunk_chars=chunk_chars)
    train, val = split_examples(examples, val_fraction=val_fraction, seed=seed)
    log.info(
        "loaded %d examples from %s (%d train / %d validation)", len(examples), path, len(train), len(val)
    )
    return Dataset(train=train, validation=val, template=template, sources=[str(path)])


def write_examples(path: Path, examples: Sequence[Example], max_lines: int = 256) -> int:
    """Keep a sample of training prompts beside an adapter so centroids can be recomputed later."""
    step = max(1, len(examples) // max_lines) if max_lines else 1
    sample = list(examples)[::step][:max_lines]
    with path.open("w", encoding="utf-8") as fh:
        for ex in sample:
            fh.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
    return len(sample)


def read_examples(path: Path) -> list[Example]:
    """Read an ``examples.jsonl`` written by :func:`write_examples`."""
    out = []
    for line in read_text(path).splitlines():
        if line.strip():
            rec = json.loads(line)
            out.append(
                Example(
                    rec.get("prompt", ""),
                    rec.get("completion", ""),
                    rec.get("source", ""),
                    rec.get("query", ""),
                )
            )
    return out
