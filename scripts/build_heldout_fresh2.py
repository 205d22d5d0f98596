"""Build `tests/data/routing/heldout_{code,literature}_fresh2.jsonl`: a second fresh pair of
held-out routing sources (issue 25), built and committed *before* the revised three-way form head
was scored, after the first fresh pair (`scripts/build_heldout_fresh.py`) had been used to compare
form rules. Run once by hand; every input is a file already on the machine, nothing is downloaded:

    SP=.venv/lib/python3*/site-packages
    python scripts/build_heldout_fresh2.py tests/data/routing \
        --cpp $SP/torch $SP/torchgen $SP/triton $SP/greenlet $SP/tvm_ffi $SP/sklearn $SP/srsly \
        --readmes $SP/*.dist-info

* `cpp` (code): C++ sources of installed packages (`*.cpp`, `*.cc`, `*.hpp`), a language no
  example and no other held-out source is written in, cut into blocks exactly as
  `scripts/build_heldout_sources.py` cuts code (comments kept, licence headers skipped).
* `readme-prose` (literature): prose paragraphs of the installed packages' descriptions (the
  README that `*.dist-info/METADATA` carries after its headers): expository prose about software,
  the form/topic conflict of the Zen and licence sources, but no licence text (paragraphs naming a
  licence, copyright or warranty are left out, so none overlaps `licence-prose`). A paragraph is
  kept when, whitespace joined, it has 60-600 characters, starts with a capital letter, ends with
  a full stop, has at least 10 words, and holds no markup or code: none of `{};=<>$[]|*#@\\` and
  backticks, no URL, no `::`, `>>>` or `name(`, and no line that opens a list, a heading, an
  underline, a directive or an indented block. Deduplicated.
Deterministic: files sorted, every k-th item taken.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_heldout_sources import LICENCE, code_records, paragraphs, sampled, write_records  # noqa: E402

MARKUP = re.compile(r"[{};=<>$\[\]|*#@\\`]|https?:|www\.|::|>>>|\b\w+\(")
LINE_OPENERS = re.compile(r"^(\s|[-+*>#=~^.:|]|\d+[.)]\s)")


def readme_records(roots: list[str], n: int) -> list[dict]:
    files = sorted({p for r in roots for p in Path(r).rglob("METADATA") if p.is_file()})
    bodies = [f.read_text(errors="replace").split("\n\n", 1) for f in files]  # headers, then the description

    def keep(text: str, lines: list[str]) -> bool:
        return (text[:1].isupper() and text.endswith(".") and len(text.split()) >= 10 and not MARKUP.search(text)
                and not LICENCE.search(text) and not any(LINE_OPENERS.match(ln) for ln in lines))

    return sampled(paragraphs([b[1] for b in bodies if len(b) == 2], keep), n, "readme-prose")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--cpp", nargs="+", required=True)
    ap.add_argument("--readmes", nargs="+", required=True)
    ap.add_argument("-n", type=int, default=30, help="texts per source")
    a = ap.parse_args()
    code = code_records("cpp", a.cpp, ("*.cpp", "*.cc", "*.hpp"), a.n)
    lit = readme_records(a.readmes, a.n)
    write_records(a.out, {"heldout_code_fresh2": code, "heldout_literature_fresh2": lit})


if __name__ == "__main__":
    main()
