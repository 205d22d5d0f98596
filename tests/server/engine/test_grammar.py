"""Grammar-constrained rows in the batched step: every constrained answer follows its grammar,
whatever adapters shape the logits, and a free row beside constrained rows produces exactly the
tokens it produces alone."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from server.engine.grammar import GrammarCompiler, GrammarSpec, RowGrammar, json_schema_spec, mask_rows
from tests.server.engine.rows import PROMPT, held_row, tiny_engine, token_ids
from tests.tiny import build_tokenizer, run_engine

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "kind": {"enum": ["a", "b"]}, "ok": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
    "required": ["name", "n", "kind", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler.for_tokenizer(tok, len(tok), [tok.eos_token_id])


@pytest.fixture()
def engine(store, tiny_model_dir, one_torch_thread):
    return tiny_engine(store, tiny_model_dir)


def test_mask_touches_constrained_rows_only(compiler):
    logits = torch.randn(3, compiler.vocab_size, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    g = RowGrammar(compiler.compile(GrammarSpec("choice", json.dumps(["yes", "no"]))))
    out = mask_rows(logits, [None, g, None])
    assert torch.equal(out[0], before[0]) and torch.equal(out[2], before[2])
    allowed = torch.isfinite(out[1])
    assert 0 < int(allowed.sum()) < compiler.vocab_size
    assert torch.equal(out[1][allowed], before[1][allowed])


def test_bad_grammar_is_a_clear_400(compiler):
    from server.engine.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as e:
        compiler.compile(GrammarSpec("regex", "(unclosed", "guided_regex"))
    assert e.value.param == "guided_regex"


def _decode(tok):
    return lambda ids: str(tok.decode(ids, skip_special_tokens=True))


def test_constrained_rows_validate_and_free_rows_are_untouched(engine, compiler, tok):
    compiled = compiler.compile(json_schema_spec(SCHEMA, "guided_json"))
    free = lambda: [held_row(engine, PROMPT, {"alpha": 1.0}, max_tokens=10),  # noqa: E731
                    held_row(engine, PROMPT[:4], {"beta": 1.0}, max_tokens=10, temperature=0.9, seed=5)]
    alone = run_engine(engine, free())
    clean = [token_ids(evs) for evs in alone.values()]
    frees = free()
    constrained = []
    for k, (weights, sampling) in enumerate([({"alpha": 1.0}, {}), ({"beta": 1.0}, {"temperature": 1.0, "seed": 1}),
                                             ({"alpha": 0.3, "beta": 0.7}, {"temperature": 1.3, "seed": 2}),
                                             ({}, {"temperature": 1.0, "top_k": 50, "seed": 3})]):
        seq = held_row(engine, PROMPT[k:], weights, max_tokens=100, decode=_decode(tok), **sampling)
        seq.grammar = RowGrammar(compiled)
        constrained.append(seq)
    events = run_engine(engine, [constrained[0], frees[0], constrained[1], constrained[2], frees[1], constrained[3]])
    assert [token_ids(events[s.id]) for s in frees] == clean
    for seq in constrained:
        assert events[seq.id][-1].finish_reason == "stop", events[seq.id][-1]
        jsonschema.validate(json.loads(seq.text), SCHEMA)


def test_bounded_json_strings_refuse_raw_control_characters(compiler):
    # xgrammar 0.2 lets them through in strings with maxLength; engine/grammar.py tightens the class
    spec = json_schema_spec({"type": "string", "maxLength": 6}, "guided_json")
    g = RowGrammar(compiler.compile(spec))
    assert not g.matcher.accept_string('"a\x07')
    assert RowGrammar(compiler.compile(spec)).matcher.accept_string('"ab"')
