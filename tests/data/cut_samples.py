"""How the samples in this folder were cut (kept so they can be re-cut or enlarged).

    python tests/data/cut_samples.py SRC

SRC is a folder holding the full data sets in the same layout (`gutenberg/*.txt`,
`codealpaca/*.json`, `gsm8k/*.jsonl`, ...); see README.md here for where each comes from. The
samples keep what the tests look at: Gutenberg excerpts keep their BOM, CRLF line endings, header,
`*** START/END` markers and the start of the licence footer; JSONL files keep their first lines
byte for byte; JSON arrays keep their first records, one per line.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
JSONL = {"gsm8k/train.jsonl": 50, "gsm8k/test.jsonl": 160}
JSON = {"codealpaca/code_alpaca_2k.json": 250, "codealpaca/new_codealpaca.json": 5,
        "alpaca_gpt4_en_demo/alpaca_en_demo.json": 45}
SHAKESPEARE_CHARS = 8000
BOOK_PARAGRAPHS = 25  # paragraphs of >= 200 characters per book: 8 x 25 >= the 190 the routing tests use
FOOTER_LINES = 30


def cut_book(src: Path, dst: Path) -> None:
    raw = src.read_bytes()
    bom, text = (raw[:3], raw[3:].decode()) if raw.startswith(b"\xef\xbb\xbf") else (b"", raw.decode())
    start = re.search(r"^\*\*\* ?START OF.*\*\*\*\s*$", text, re.M)
    end = re.search(r"^\s*\*\*\* ?END OF.*\*\*\*\s*$", text, re.M)
    assert start and end, src
    paras = re.split(r"(?:\r\n){2,}", text[start.end():end.start()].strip("\r\n"))
    first = next(i for i, p in enumerate(paras) if "It is a truth universally" in p) if src.name == "pg1342.txt" \
        else next(i for i, p in enumerate(paras) if len(" ".join(p.split())) >= 200)
    picked, long = [], 0
    for p in paras[first:]:
        picked.append(p)
        long += len(" ".join(p.split())) >= 200
        if long == BOOK_PARAGRAPHS:
            break
    lines = text[end.start():].split("\r\n")
    # the footer's opening lines; Pride and Prejudice keeps it up to the licence's name (a test looks for it)
    n = FOOTER_LINES if src.name != "pg1342.txt" else \
        next(i for i, line in enumerate(lines) if "Project Gutenberg License" in line) + 1
    footer = "\r\n".join(lines[:n])
    body = text[: start.end()] + "\r\n\r\n" + "\r\n\r\n".join(picked) + "\r\n\r\n\r\n" + footer + "\r\n"
    dst.write_bytes(bom + body.encode())


def main(src: Path) -> None:
    for book in sorted((src / "gutenberg").glob("*.txt")):
        (HERE / "gutenberg").mkdir(exist_ok=True)
        cut_book(book, HERE / "gutenberg" / book.name)
    for rel, n in JSONL.items():
        (HERE / rel).parent.mkdir(exist_ok=True)
        lines = (src / rel).read_text(encoding="utf-8").splitlines(keepends=True)
        (HERE / rel).write_text("".join(lines[:n]), encoding="utf-8")
    for rel, n in JSON.items():
        (HERE / rel).parent.mkdir(exist_ok=True)
        records = json.loads((src / rel).read_text(encoding="utf-8"))[:n]
        rows = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
        (HERE / rel).write_text(f"[\n{rows}\n]\n", encoding="utf-8")
    play = (src / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    cut = play[: play.rindex("\n\n", 0, SHAKESPEARE_CHARS) + 1]
    (HERE / "tinyshakespeare").mkdir(exist_ok=True)
    (HERE / "tinyshakespeare" / "input.txt").write_text(cut, encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
