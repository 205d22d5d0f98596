"""Build the routing test data under tests/data/routing/ (run once; the output is committed).

Centroid examples (the only input the routers get): 40 CodeAlpaca instructions and 40 Project
Gutenberg paragraphs, drawn the way the server tests always drew them. Held-out sets come from
*other* sources, so they measure out-of-distribution routing:

* code: function definitions from CPython's standard library (docstrings removed), C snippets
  from CPython's public headers, and code requests from a different instruction set
  (LLaMA-Factory's alpaca_en_demo);
* literature: Tiny Shakespeare speeches and stories / poems from alpaca_en_demo.

Every source's path is an argument: nothing here knows where the data sets live.

    python scripts/build_routing_data.py --codealpaca code_alpaca_2k.json --gutenberg GUTENBERG_DIR \
        --shakespeare input.txt --alpaca-demo alpaca_en_demo.json --stdlib "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
        --include "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "routing"
MAX_CHARS = 600
N_EXAMPLES = 40


def clip(text: str, n: int = MAX_CHARS) -> str:
    """At most `n` characters, cut at a line or word boundary."""
    if len(text) <= n:
        return text
    cut = text[:n]
    for sep in ("\n", " "):
        if sep in cut[n // 2 :]:
            return cut[: cut.rindex(sep)]
    return cut


def gutenberg_paragraphs(path: Path, min_chars: int = 200) -> list[str]:
    text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF.*\*\*\*\s*$", text, re.M)
    end = re.search(r"^\s*\*\*\* ?END OF.*\*\*\*\s*$", text, re.M)
    assert start and end, path
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text[start.end() : end.start()]))
    return [p for p in paras if len(p) >= min_chars]


def examples(codealpaca: Path, gutenberg: Path) -> dict[str, list[str]]:
    """The server tests' centroid examples: shuffled with Random(0), first 40, cut to 600 chars."""
    records = json.loads(codealpaca.read_text())
    code = [(r["instruction"] + ("\n" + r["input"] if r.get("input") else "")).strip() for r in records]
    lit: list[str] = []
    for book in sorted(gutenberg.glob("*.txt")):
        lit += [clip(p, MAX_CHARS) for p in gutenberg_paragraphs(book)]
    rng = random.Random(0)
    out = {}
    for name, texts in (("code", code), ("literature", lit)):
        rng.shuffle(texts)
        out[name] = [t[:MAX_CHARS] for t in texts[:N_EXAMPLES]]
    return out


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]


def stdlib_functions(stdlib: Path, n: int, rng: random.Random) -> list[dict]:
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))
    rng.shuffle(files)
    out: list[dict] = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        _strip_docstrings(tree)
        funcs = [f for f in tree.body if isinstance(f, ast.FunctionDef)]
        funcs += [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body if isinstance(m, ast.FunctionDef)]
        funcs = [f for f in funcs if len(f.body) >= 3]
        if not funcs:
            continue
        src = ast.unparse(rng.choice(funcs))
        if len(src) >= 150:
            out.append({"text": clip(src), "source": f"cpython-stdlib/{path.name}"})
        if len(out) == n:
            break
    return out


def c_header_snippets(include: Path, n: int, rng: random.Random) -> list[dict]:
    """Runs of consecutive non-comment lines (declarations, macros, structs) from CPython's headers."""
    out: list[dict] = []
    files = sorted(include.rglob("*.h"))
    rng.shuffle(files)
    for path in files:
        text = re.sub(r"/\*.*?\*/", "", path.read_text(encoding="utf-8", errors="replace"), flags=re.S)
        blocks = [b.strip() for b in re.split(r"\n\s*\n", text) if len(b.strip()) >= 200]
        if blocks:
            out.append({"text": clip(rng.choice(blocks)), "source": f"cpython-include/{path.relative_to(include)}"})
        if len(out) == n:
            break
    return out


# Hand-checked: code requests (with or without code in them), picked by `_code_request` and read
# one by one; the ones listed here matched the pattern but are not about programming.
_NOT_CODE = ("script of", "summarize", "article", "questions into", "play with", "evaluate y(", "sales call",
             "quadratic", "machine learning algorithm", "define a computer algorithm", "predicting house",
             "identify if a sentence", "nouns from")
_CODE = re.compile(r"\b(python|java|javascript|sql|html|c program|code|function|array|linked-list|leetcode|pseudocode)\b", re.I)


def alpaca_code_requests(demo: list[dict], n: int) -> list[dict]:
    out = []
    for r in demo:
        text = (r["instruction"] + ("\n" + r["input"] if r.get("input") else "")).strip()
        if _CODE.search(text) and not any(s in text.lower() for s in _NOT_CODE):
            out.append({"text": clip(text), "source": "alpaca_en_demo (code request)"})
    return out[:n]


def alpaca_stories(demo: list[dict], n: int) -> list[dict]:
    out = []
    for r in demo:
        if re.search(r"\b(story|poem|narrative|tale|haiku|fable)\b", r["instruction"], re.I) and len(r["output"]) >= 200 \
                and not re.search(r"\b(point of view|identify|analy[sz]e|summar)", r["instruction"], re.I):
            out.append({"text": clip(r["output"]), "source": "alpaca_en_demo (story/poem output)"})
    return out[:n]


def shakespeare_speeches(path: Path, n: int, rng: random.Random) -> list[dict]:
    """Speeches of at least 200 characters, speaker names dropped (they would be a giveaway format)."""
    blocks = [b.strip().split("\n", 1) for b in path.read_text().split("\n\n")]
    speeches = [" ".join(b[1].split()) for b in blocks if len(b) == 2 and b[0].endswith(":")]
    speeches = [s for s in speeches if len(s) >= 200]
    rng.shuffle(speeches)
    return [{"text": clip(s), "source": "tinyshakespeare"} for s in speeches[:n]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--codealpaca", "--gutenberg", "--shakespeare", "--alpaca-demo", "--stdlib", "--include"):
        p.add_argument(flag, type=Path, required=True)
    a = p.parse_args()
    rng = random.Random(14)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, texts in examples(a.codealpaca, a.gutenberg).items():
        source = "codealpaca/code_alpaca_2k.json" if name == "code" else "project-gutenberg (8 novels)"
        rows = [{"text": t, "source": source} for t in texts]
        (OUT / f"examples_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo = json.loads(a.alpaca_demo.read_text())
    code = stdlib_functions(a.stdlib, 120, rng) + c_header_snippets(a.include, 40, rng) + alpaca_code_requests(demo, 40)
    lit = shakespeare_speeches(a.shakespeare, 150, rng) + alpaca_stories(demo, 50)
    for name, rows in (("code", code), ("literature", lit)):
        (OUT / f"heldout_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(name, len(rows), {s: sum(r["source"].split("/")[0] == s for r in rows) for s in {r["source"].split("/")[0] for r in rows}})


if __name__ == "__main__":
    main()
