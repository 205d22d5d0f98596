"""Plain-text handling: encoding quirks, Project Gutenberg boilerplate, passage chunking.

Gutenberg files (as staged in ``shared/data/gutenberg``) start with a UTF-8 BOM, use CRLF
line ends, wrap prose at ~70 columns and carry a licence header and footer around the
book. None of that is literature a "literature" adapter should learn, so it is removed
before the text is cut into passages of a bounded size.
"""

from __future__ import annotations

import re
from pathlib import Path

_PG_START = re.compile(r"^\s*\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_PG_END = re.compile(r"^\s*\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def read_text(path: Path) -> str:
    """Read UTF-8 text, dropping a BOM and normalising CRLF / CR to LF."""
    raw = path.read_bytes().decode("utf-8-sig", errors="replace")
    return raw.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Keep only what lies between the ``*** START OF`` and ``*** END OF`` markers.

    Returns the body and whether markers were found; text without them is returned as is.
    """
    start = _PG_START.search(text)
    end = _PG_END.search(text)
    if not start and not end:
        return text, False
    lo = start.end() if start else 0
    hi = end.start() if end and (not start or end.start() > lo) else len(text)
    return text[lo:hi].strip("\n"), True


def chunk_passages(text: str, chunk_chars: int = 1000, unwrap: bool = False) -> list[str]:
    """Pack blank-line separated paragraphs into passages of about ``chunk_chars`` characters.

    ``unwrap`` joins hard-wrapped lines inside a paragraph (Gutenberg prose is wrapped at
    ~70 columns, which a model would otherwise learn as a style); verse and dialogue such
    as Tiny Shakespeare keep their line breaks. A paragraph longer than ``chunk_chars`` is
    split at line (or word) boundaries so no passage grows without bound.
    """
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if unwrap:
            para = re.sub(r"\s*\n\s*", " ", para)
        paragraphs.extend(_split_long(para, chunk_chars))
    passages: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        if current and size + len(para) > chunk_chars:
            passages.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        passages.append("\n\n".join(current))
    return passages


def _split_long(para: str, limit: int) -> list[str]:
    if len(para) <= limit:
        return [para]
    sep = "\n" if "\n" in para else " "
    out: list[str] = []
    buf = ""
    for piece in para.split(sep):
        if buf and len(buf) + len(piece) + 1 > limit:
            out.append(buf)
            buf = piece
        else:
            buf = f"{buf}{sep}{piece}" if buf else piece
    if buf:
        out.append(buf)
    return out
