"""Rebuild the starter data shipped in ``training/starter_data/`` (what ``switchboard demo`` trains on).

The three samples are small on purpose (a few hundred KB in all, so they ride along in the
wheel) and licence-clean:

* ``code.jsonl``  — Python functions of CPython's own standard library (PSF License 2.0), as
  Alpaca records: the docstring's summary and the signature are the instruction, the function
  (docstring removed) is the output. Built from the interpreter running this script.
* ``prose.jsonl`` — passages of public-domain novels from Project Gutenberg plain-text files.
* ``math.jsonl``  — grade-school word problems with worked answers from GSM8K (MIT License).

Usage (the inputs are the upstream files; nothing is downloaded)::

    python scripts/build_starter_data.py --gsm8k PATH/TO/gsm8k/train.jsonl \
        --gutenberg PATH/TO/pg1342.txt PATH/TO/pg1661.txt PATH/TO/pg120.txt PATH/TO/pg521.txt

Selection is deterministic (fixed strides, no randomness), so a rebuild from the same inputs and
the same Python version gives the same files.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.text import chunk_passages, read_text, strip_gutenberg  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "training" / "starter_data"

# Pure-Python stdlib modules with plain, self-contained helper functions.
STDLIB_MODULES = (
    "textwrap", "string", "shlex", "fnmatch", "posixpath", "genericpath", "statistics", "heapq", "bisect",
    "colorsys", "calendar", "fractions", "difflib", "base64", "html/__init__", "urllib/parse", "ipaddress",
    "glob", "shutil", "functools", "random", "csv", "quopri", "json/encoder", "json/decoder", "email/utils",
    "gettext", "locale", "mimetypes", "netrc", "ntpath", "operator", "pprint", "reprlib", "secrets",
    "sre_parse", "tokenize", "traceback", "types", "uuid", "wave", "zipfile", "tarfile", "smtplib",
    "http/cookies", "http/client", "inspect", "dataclasses", "enum", "argparse", "configparser", "copy",
    "datetime", "decimal", "_pydecimal", "codecs", "contextlib", "keyword", "linecache", "numbers",
    "platform", "plistlib", "pydoc", "sched", "selectors", "socket", "subprocess", "tempfile", "timeit",
    "weakref", "ast", "dis", "filecmp", "graphlib", "hashlib", "hmac", "imghdr", "logging/__init__",
    "mailbox", "nturl2path", "opcode", "pathlib", "pickletools", "pkgutil", "poplib", "pstats", "py_compile",
    "quopri", "rlcompleter", "runpy", "shelve", "site", "sndhdr", "stat", "symtable", "tabnanny", "this",
    "threading", "trace", "tty", "typing", "uu", "warnings", "webbrowser", "xdrlib", "zipapp",
)


def _summary(doc: str) -> str:
    first = doc.strip().split("\n\n", 1)[0]
    return " ".join(first.split())


def code_records(limit: int, max_lines: int = 24) -> list[dict]:
    """Functions from the running interpreter's standard library: 3-24 body lines, a one-paragraph
    docstring summary, public names only, one per (module, name)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records: list[dict] = []
    seen: set[str] = set()
    for module in dict.fromkeys(STDLIB_MODULES):
        path = stdlib / f"{module}.py"
        if not path.is_file():
            continue
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or node.end_lineno is None:
                continue
            summary = _summary(doc)
            n_lines = node.end_lineno - node.lineno + 1
            if not 20 <= len(summary) <= 240 or not 5 <= n_lines <= max_lines or summary in seen:
                continue
            body = node.body[1:]  # drop the docstring statement
            if not body:
                continue
            head = lines[node.lineno - 1 : node.body[0].lineno - 1]
            if node.decorator_list:
                head = lines[node.decorator_list[0].lineno - 1 : node.body[0].lineno - 1]
            tail = lines[body[0].lineno - 1 : node.end_lineno]
            code = textwrap.dedent("\n".join(head + tail))
            signature = ast.unparse(node.args)
            seen.add(summary)
            records.append({
                "instruction": f"Write a Python function `{node.name}({signature})`. {summary}",
                "input": "",
                "output": code,
                "source": f"cpython Lib/{module}.py:{node.lineno}",
            })
    step = max(1, len(records) // limit)
    return records[::step][:limit]


def prose_records(files: list[Path], per_book: int, chunk_chars: int = 700) -> list[dict]:
    """Passages from the middle of each book (front matter and tables of contents skipped)."""
    out: list[dict] = []
    for f in files:
        body, _ = strip_gutenberg(read_text(f))
        passages = [p for p in chunk_passages(body, chunk_chars=chunk_chars, unwrap=True) if len(p) >= 300]
        inner = passages[len(passages) // 10 : -len(passages) // 10 or None]
        step = max(1, len(inner) // per_book)
        out.extend({"text": p, "source": f"Project Gutenberg {f.stem}"} for p in inner[::step][:per_book])
    return out


def math_records(path: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in read_text(path).splitlines() if line.strip()]
    step = max(1, len(rows) // limit)
    return [{"question": r["question"], "answer": r["answer"]} for r in rows[::step][:limit]]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{path.name}: {len(records)} records, {path.stat().st_size / 1024:.0f} KiB")


FORMS = Path(__file__).with_name("starter_forms.jsonl")  # hand-written: shell, C, SQL, ...; verse, aphorisms, dialogue


def forms(file: str) -> list[dict]:
    """The hand-written records of `FORMS` for `file` ("code" or "prose"), appended after the
    sampled ones so the starter adapters' examples cover the forms users type."""
    rows = [json.loads(line) for line in read_text(FORMS).splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "file"} for r in rows if r["file"] == file]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gsm8k", type=Path, required=True, help="GSM8K train.jsonl")
    p.add_argument("--gutenberg", type=Path, nargs="+", required=True, help="Project Gutenberg .txt files")
    p.add_argument("--n", type=int, default=240, help="records per domain")
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "code.jsonl", code_records(a.n) + forms("code"))
    write_jsonl(OUT / "prose.jsonl", prose_records(a.gutenberg, max(1, a.n // len(a.gutenberg))) + forms("prose"))
    write_jsonl(OUT / "math.jsonl", math_records(a.gsm8k, a.n))


if __name__ == "__main__":
    main()
