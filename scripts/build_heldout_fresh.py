"""Build `tests/data/routing/heldout_{code,literature}_fresh.jsonl`: held-out routing texts added
*after* the other held-out sources had been used to compare routers (issue 25), so that at least
some held-out numbers come from sources nobody looked at before choosing. Run once by hand;
every input is a file already on the machine, nothing is downloaded:

    python scripts/build_heldout_fresh.py tests/data/routing \
        --tcl /usr/share/tcltk/tcl8.6 /usr/share/tcltk/tk8.6 \
        --licences .venv/lib/python3*/site-packages/*.dist-info

* `tcl` (code): Tcl/Tk 8.6 library scripts, cut into blocks exactly as
  `scripts/build_heldout_sources.py` cuts code (comments kept, licence headers skipped).
* `zen-of-python` (literature): the 19 aphorisms of PEP 20 as CPython's `this` module holds them
  (rot13), one per text: short prose about programming, the form/topic conflict of the
  `fortune-computers` quips.
* `licence-prose` (literature): paragraphs of the permissive licence files (MIT, BSD, ISC,
  Apache's short notices) shipped in installed packages' `*.dist-info`: legal prose about software,
  deduplicated, 60-600 characters.
Deterministic: files sorted, every k-th item taken.
"""

from __future__ import annotations

import argparse
import codecs
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_heldout_sources import code_records, paragraphs, sampled, write_records  # noqa: E402


def zen_records() -> list[dict]:
    import this  # noqa: F401  (prints the Zen once; its `s` holds it rot13-encoded)

    lines = codecs.decode(this.s, "rot13").splitlines()
    return [{"text": ln.strip(), "source": "zen-of-python"} for ln in lines[2:] if ln.strip()]


def licence_records(roots: list[str], n: int) -> list[dict]:
    files = sorted({p for r in roots for p in Path(r).rglob("*") if p.is_file()
                    and re.match(r"(LICEN[CS]E|COPYING)", p.name, re.I)})
    pool = paragraphs([f.read_text(errors="replace") for f in files],
                      lambda text, _lines: not re.search(r"[{};=<>$]", text))
    return sampled(pool, n, "licence-prose")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--tcl", nargs="+", required=True)
    ap.add_argument("--licences", nargs="+", required=True)
    ap.add_argument("-n", type=int, default=30, help="texts per source")
    a = ap.parse_args()
    code = code_records("tcl", a.tcl, ("*.tcl",), a.n)
    lit = zen_records() + licence_records(a.licences, a.n)
    write_records(a.out, {"heldout_code_fresh": code, "heldout_literature_fresh": lit})


if __name__ == "__main__":
    main()
