"""Build `tests/data/routing/heldout_{code,literature}_sources.jsonl`: held-out routing texts from
sources no router here is fitted on (see tests/data/routing/README.md for sources and licences).

Run once by hand; every input is a path argument, nothing is downloaded:

    python scripts/build_heldout_sources.py OUT_DIR \
        --sql /usr/share/postgresql/15/extension \
        --js /usr/lib/node_modules/npm/node_modules/semver /usr/lib/node_modules/npm/node_modules/tar \
        --perl /usr/share/perl/5.36.0 \
        --shell /root/.pyenv/libexec \
        --c /usr/share/doc/zlib1g-dev/examples /usr/share/doc/liblzma-dev/examples \
            /usr/share/doc/libxmlsec1-dev/examples \
        --fortunes DIR_OF_FORTUNE_FILES   # Debian package `fortunes` (fortune-mod 1.99.1), unpacked

Code is cut into blocks at blank lines (comments kept: pasted code often opens with an English
comment, which is what a topic-only router gets wrong); licence headers and comment-only blocks
are skipped. Deterministic: files sorted, every k-th block taken.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

MAX_CHARS, MIN_CHARS = 600, 120
COMMENT = re.compile(r"^\s*(#|//|/\*|\*|--|=(pod|head|item|cut|over|back|begin|end))")
LICENCE = re.compile(r"copyright|licen[cs]e|warranty|permission is hereby", re.I)


def blocks(text: str) -> list[str]:
    """Blank-line paragraphs merged until at least MIN_CHARS, cut at MAX_CHARS (at a line end)."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= MIN_CHARS:
            out.append(cur)
            cur = ""
    cut = []
    for b in out:
        if len(b) > MAX_CHARS:
            b = b[:MAX_CHARS].rsplit("\n", 1)[0]
        lines = [ln for ln in b.splitlines() if ln.strip()]
        if len(b) < MIN_CHARS or not lines or LICENCE.search(b) or "\\echo Use" in b \
                or all(COMMENT.match(ln) for ln in lines):
            continue
        cut.append(b.rstrip())
    return cut


def strip_pod(text: str) -> str:
    """Perl without its POD documentation (prose, not code)."""
    return re.sub(r"^=\w+.*?^=cut\s*$", "", text, flags=re.M | re.S)


def code_records(name: str, roots: list[str], patterns: tuple[str, ...], n: int) -> list[dict]:
    files = sorted({p for r in roots for pat in patterns for p in Path(r).rglob(pat) if p.is_file()})
    pool: list[tuple[str, str]] = []
    for f in files:
        text = f.read_text(errors="replace")
        if name == "perl":
            text = strip_pod(text)
        if patterns == ("*",) and not text.startswith("#!"):  # shell: scripts only
            continue
        pool += [(f"{name}/{f.name}", b) for b in blocks(text)]
    step = max(len(pool) // n, 1)
    return [{"text": t, "source": s} for s, t in pool[::step][:n]]


def fortune_records(folder: str, files: tuple[str, ...], n: int) -> list[dict]:
    out = []
    for fname in files:
        entries = [e.strip("\n") for e in (Path(folder) / fname).read_text(errors="replace").split("\n%\n")]
        entries = [e for e in entries if MIN_CHARS // 2 <= len(e) <= MAX_CHARS and not re.search(r"[{};=<>$]", e)]
        step = max(len(entries) // n, 1)
        out += [{"text": e, "source": f"fortune-{fname}"} for e in entries[::step][:n]]
    return out


def paragraphs(texts: list[str], keep: Callable[[str, list[str]], bool]) -> list[str]:
    """The blank-line-separated paragraphs of `texts`, whitespace joined, within the length
    bounds, each once (case-insensitively), that `keep(text, its non-blank lines)` accepts."""
    seen: set[str] = set()
    pool = []
    for body in texts:
        for para in re.split(r"\n\s*\n", body):
            text = " ".join(para.split())
            lines = [ln for ln in para.splitlines() if ln.strip()]
            if MIN_CHARS // 2 <= len(text) <= MAX_CHARS and text.lower() not in seen and keep(text, lines):
                seen.add(text.lower())
                pool.append(text)
    return pool


def sampled(pool: list[str], n: int, source: str) -> list[dict]:
    """`n` of `pool`'s texts spread evenly over it (the pool is in file order), as records."""
    step = max(len(pool) // n, 1)
    return [{"text": t, "source": source} for t in pool[::step][:n]]


def write_records(out: Path, files: dict[str, list[dict]]) -> None:
    """Each list of records as `out/NAME.jsonl`, one JSON object a line."""
    for name, rows in files.items():
        with open(out / f"{name}.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(name, len(rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    for lang in ("sql", "js", "perl", "shell", "c"):
        ap.add_argument(f"--{lang}", nargs="+", required=True)
    ap.add_argument("--fortunes", required=True)
    ap.add_argument("-n", type=int, default=30, help="texts per source")
    a = ap.parse_args()
    code = (code_records("sql", a.sql, ("*.sql",), a.n) + code_records("javascript", a.js, ("*.js",), a.n)
            + code_records("perl", a.perl, ("*.pm",), a.n) + code_records("shell", a.shell, ("*",), a.n)
            + code_records("c", a.c, ("*.c",), a.n))
    lit = fortune_records(a.fortunes, ("songs-poems", "wisdom", "literature", "computers"), a.n)
    write_records(a.out, {"heldout_code_sources": code, "heldout_literature_sources": lit})


if __name__ == "__main__":
    main()
