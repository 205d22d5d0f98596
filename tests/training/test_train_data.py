"""Data loading for `switchboard-train` on samples of real data sets (tests/data) and small synthetic files."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.paths import REPO
from training import data as D


def test_gutenberg_header_footer_bom_crlf(sample_data: Path) -> None:
    path = sample_data / "gutenberg" / "pg1342.txt"
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw  # the file really has a BOM and CRLF
    examples, template = D.load_file(path)
    assert template["name"] == "plain"
    assert len(examples) > 10  # the sample is an excerpt of ~17 KB
    joined = "".join(ex.text for ex in examples)
    assert "\r" not in joined and "\ufeff" not in joined
    assert "*** START OF" not in joined and "*** END OF" not in joined
    assert "Project Gutenberg License" not in joined  # the footer is gone
    assert "It is a truth universally acknowledged" in joined
    # Gutenberg prose is unwrapped inside paragraphs: no hard line breaks inside a passage's paragraphs.
    assert all("\n" not in para for ex in examples[5:20] for para in ex.prompt.split("\n\n"))
    assert max(len(ex.prompt) for ex in examples) <= 1000 + 200


def test_plain_text_bom_crlf_and_markers_synthetic(tmp_path: Path) -> None:
    body = (
        "Header junk\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n\r\nOne line\r\nwraps here.\r\n\r\n"
    )
    body += "Second para.\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nLicense text\r\n"
    f = tmp_path / "book.txt"
    f.write_bytes(b"\xef\xbb\xbf" + body.encode())
    examples, _ = D.load_file(f, chunk_chars=1000)
    assert [ex.prompt for ex in examples] == ["One line wraps here.\n\nSecond para."]


def test_tinyshakespeare_keeps_verse_lines(sample_data: Path) -> None:
    examples, _ = D.load_examples(sample_data / "tinyshakespeare" / "input.txt", limit=5)
    assert len(examples) == 5
    assert examples[0].prompt.startswith("First Citizen:\nBefore we proceed")


def test_alpaca_codealpaca_and_demo(sample_data: Path) -> None:
    examples, template = D.load_examples(sample_data / "codealpaca" / "code_alpaca_2k.json", limit=50)
    assert template["name"] == "alpaca" and len(examples) == 50
    with_input = next(ex for ex in examples if "### Input:" in ex.prompt)
    assert with_input.prompt.endswith("### Response:\n") and with_input.completion
    assert with_input.query and "Below is an instruction" not in with_input.query
    assert with_input.routing_text == with_input.query
    new, _ = D.load_examples(sample_data / "codealpaca" / "new_codealpaca.json", limit=5)
    assert all(ex.completion for ex in new)
    demo, _ = D.load_examples(sample_data / "alpaca_gpt4_en_demo" / "alpaca_en_demo.json", limit=5)
    assert demo[0].query == "Describe a process of making crepes."


def test_gsm8k_question_answer(sample_data: Path) -> None:
    examples, template = D.load_examples(sample_data / "gsm8k" / "train.jsonl", limit=3)
    assert template["name"] == "alpaca"
    assert examples[0].query.startswith("Natalia sold clips")
    assert "#### 72" in examples[0].completion


def test_text_jsonl_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"passage {i}"}) for i in range(4)) + "\n")
    examples, template = D.load_examples(f)
    assert template["name"] == "plain" and [ex.prompt for ex in examples][:2] == ["passage 0", "passage 1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(D.DataError):
        D.load_examples(bad)
    with pytest.raises(D.DataError):
        D.load_examples(tmp_path / "missing.json")


def test_split_is_deterministic_and_stable_under_limit(sample_data: Path) -> None:
    path = sample_data / "codealpaca" / "code_alpaca_2k.json"
    small = D.load_dataset(path, limit=200)
    large = D.load_dataset(path, limit=800)
    again = D.load_dataset(path, limit=200)
    assert [e.text for e in small.validation] == [e.text for e in again.validation]
    assert small.data_hash() == again.data_hash() != large.data_hash()
    large_val = {e.text for e in large.validation}
    assert small.validation and all(e.text in large_val for e in small.validation)
    assert 0.03 < len(large.validation) / len(large.all) < 0.2  # 800, or all the sample has
    train, val = D.split_examples(small.all[:2], val_fraction=0.1)
    assert len(train) == 1 and len(val) == 1


def test_folder_limit_round_robin(sample_data: Path) -> None:
    examples, _ = D.load_examples(sample_data / "gutenberg", limit=16)
    assert len({ex.source for ex in examples}) == 8


def test_examples_roundtrip(tmp_path: Path, sample_data: Path) -> None:
    examples, _ = D.load_examples(sample_data / "gsm8k" / "test.jsonl", limit=40)
    n = D.write_examples(tmp_path / "examples.jsonl", examples, max_lines=16)
    back = D.read_examples(tmp_path / "examples.jsonl")
    assert n == len(back) == 16 and back[0] == examples[0]


def test_training_never_imports_server() -> None:
    """Static check over every module (an import test would cost seconds of transformers import)."""
    root = REPO / "training"
    offenders = []
    for f in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{f.name}: {n}" for n in names if n == "server" or n.startswith("server.")]
    assert not offenders
