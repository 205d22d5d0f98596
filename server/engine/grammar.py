"""Grammar-constrained decoding per row, through xgrammar (arXiv 2411.15100).

A request that asks for structured output (a JSON schema, any JSON object, a regex, a choice
of strings, an EBNF grammar) gets a compiled grammar and, per row, a matcher that tracks how far
the row's text has come through it. Before each sampling step the engine fills a token bitmask
for every constrained row and sets the logits of the tokens the grammar forbids to -inf
(`mask_rows`, the one place the masks touch logits); after the row takes its token the matcher
advances (`RowGrammar.accept`). Free rows in the same batch are never touched, so a constrained
neighbour cannot change their tokens. Routing is orthogonal: the adapters decide the logits,
the grammar decides which of them may be chosen.

xgrammar was measured against llguidance and outlines-core on this CPU with a 50257-token
byte-level BPE (docs/clients.md, "Structured outputs"): its per-step mask was the cheapest and it
works with the tiny tokenizers the tests build in code. Pure compute: no FastAPI, no files.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from server.engine.errors import InvalidRequest

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_SOURCE_CHARS = 65_536  # a schema / regex / grammar longer than this is refused before compiling


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to. `source`: the JSON schema (as canonical JSON
    text), the regex, the EBNF grammar, or the choices as a JSON list; empty for `json_object`."""

    kind: str
    source: str = ""
    param: str = "response_format"  # the request field it came from, for error messages


def json_schema_spec(schema: Any, param: str) -> GrammarSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise InvalidRequest(f"`{param}` is not valid JSON: {e}", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest(f"`{param}` must be a JSON schema object", param=param)
    return GrammarSpec("json_schema", json.dumps(schema), param)  # key order kept: it is the output's order


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r".^$*+?{}[]\|()/" else c for c in text)


_LOOSE_CHAR = '[^\\"\\\\\\r\\n]'  # EBNF `[^\"\\\r\n]`: any character but quote, backslash, CR, LF
_JSON_CHAR = '[^\\0-\\x1f\\"\\\\\\r\\n]'  # the same without U+0000-U+001F, which JSON strings must escape


def _no_raw_control_chars(ebnf: str) -> str:
    """xgrammar 0.2 writes a string with `maxLength`/`minLength` as repeats of a character class
    that lets raw control characters through (its plain strings exclude them); JSON forbids them
    unescaped, so the class is tightened before compiling."""
    return ebnf.replace(_LOOSE_CHAR, _JSON_CHAR)


class GrammarCompiler:
    """Compiles specs for one tokenizer; compiled grammars are cached (by xgrammar), so the same
    schema sent again costs nothing. Thread-safe: requests compile on worker threads."""

    def __init__(self, info: xgr.TokenizerInfo) -> None:
        self.info = info
        self.vocab_size = int(info.vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> GrammarCompiler:
        """`vocab_size`: the logits' width (it may exceed the tokenizer's length); the stop ids end
        the grammar (EOS)."""
        return cls(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids))

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """400 (`InvalidRequest`) for a schema, regex or grammar xgrammar cannot compile."""
        if len(spec.source) > MAX_SOURCE_CHARS:
            raise InvalidRequest(f"`{spec.param}` has {len(spec.source)} characters; the limit is {MAX_SOURCE_CHARS}",
                                 param=spec.param)
        try:
            with self._lock:
                return self._compile(spec)
        except InvalidRequest:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            raise InvalidRequest(f"`{spec.param}` could not be compiled into a grammar: {str(e)[:300]}",
                                 param=spec.param) from None

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        # compact separators, no free whitespace: a random or weak model cannot pad forever
        if spec.kind in ("json_schema", "json_object"):
            schema = spec.source if spec.kind == "json_schema" else json.dumps({"type": "object"})
            grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=spec.kind == "json_schema")
            return self._compiler.compile_grammar(_no_raw_control_chars(str(grammar)))
        if spec.kind == "regex":
            return self._compiler.compile_regex(spec.source)
        if spec.kind == "choice":
            choices = json.loads(spec.source)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise InvalidRequest(f"`{spec.param}` must be a non-empty list of strings", param=spec.param)
            return self._compiler.compile_regex("|".join(f"({_regex_escape(c)})" for c in choices))
        if spec.kind == "grammar":
            return self._compiler.compile_grammar(spec.source)
        raise InvalidRequest(f"unknown structured output kind {spec.kind!r}", param=spec.param)


class RowGrammar:
    """One row's place in its grammar. Owned by the row's sequence, used on the engine thread."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> None:
        """Advance past the token the row took; a token the mask allowed is always accepted,
        so a refusal means the grammar engine and the mask disagree (the row fails alone)."""
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token} that its mask allowed")

    @property
    def done(self) -> bool:
        """The grammar accepted its stop token: the output is complete."""
        return bool(self.matcher.is_terminated())


def mask_rows(logits: torch.Tensor, grammars: list[RowGrammar | None]) -> torch.Tensor:
    """Set the logits [B, V] of tokens each constrained row's grammar forbids to -inf, in place
    on the constrained rows only; free rows (None) are left exactly as they are."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(grammars), vocab)  # [B, ceil(V/32)] int32, all bits set: allowed
    for i in rows:
        grammar = grammars[i]
        assert grammar is not None
        grammar.matcher.fill_next_token_bitmask(bitmask, i)
    if logits.dtype != torch.float32:
        logits = logits.float()
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=vocab, indices=rows)
    return logits
