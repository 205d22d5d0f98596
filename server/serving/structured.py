"""Structured output on the request side: which grammar a request asks for (OpenAI's
`response_format`, vLLM's `guided_*` fields and `structured_outputs`, chat `tools`), compiled once
per request and handed to each of its rows as its own matcher (`server/engine/grammar.py`).

Tools: GPT-2 has no tool-call format of its own, so `tool_choice: "none"` and `"auto"` generate
text (the tools are not shown to the model). `"required"` and a named function make the reply
tool calls: with a named function the row generates that one function's arguments under its
`parameters` schema; with `"required"` it generates vLLM's JSON array of calls,
`[{"name": ..., "parameters": {...}}, ...]` (at least one; at most one with
`parallel_tool_calls: false`), each item under its tool's schema, and the response carries every
item as one entry of `tool_calls`.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from server.api.schemas import ChatCompletionRequest, StructuredFields
from server.engine.errors import InvalidRequest
from server.engine.grammar import GrammarCompiler, GrammarSpec, RowGrammar, json_schema_spec
from server.state import Services

_lock = threading.Lock()
_compilers: dict[int, GrammarCompiler] = {}  # per resident model (its tokenizer and vocabulary)


def compiler(state: Services) -> GrammarCompiler:
    """The resident model's grammar compiler, built on first use (a second or so for GPT-2's
    50257 tokens) and kept for the life of the resident model."""
    key = id(state.resident)
    with _lock:
        found = _compilers.get(key)
        if found is None:
            tok, config = state.resident.tokenizer, state.resident.model.config
            found = GrammarCompiler.for_tokenizer(tok, int(config.vocab_size), [int(tok.eos_token_id)])
            _compilers.clear()  # one resident model per server
            _compilers[key] = found
    return found


def _guided(schema: Any, regex: str | None, choice: list | None, grammar: str | None, param: str) -> list[GrammarSpec]:
    """vLLM's four guided kinds, named as the request names them (`param` formats the kind:
    `guided_{}` for the legacy fields, `structured_outputs.{}` for the object)."""
    found = []
    if schema is not None:
        found.append(json_schema_spec(schema, param.format("json")))
    if regex is not None:
        found.append(GrammarSpec("regex", regex, param.format("regex")))
    if choice is not None:
        found.append(GrammarSpec("choice", json.dumps(choice), param.format("choice")))
    if grammar is not None:
        found.append(GrammarSpec("grammar", grammar, param.format("grammar")))
    return found


def grammar_spec(req: StructuredFields) -> GrammarSpec | None:
    """The one constraint the request asks for, or None; 400 if it asks for several."""
    found: list[GrammarSpec] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(GrammarSpec("json_object", "", "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise InvalidRequest("response_format json_schema needs `json_schema.schema`", param="response_format")
        found.append(json_schema_spec(rf.json_schema.schema_, "response_format"))
    found += _guided(req.guided_json, req.guided_regex, req.guided_choice, req.guided_grammar, "guided_{}")
    so = req.structured_outputs
    if so is not None:
        for name in ("structural_tag", "whitespace_pattern"):
            if (so.model_extra or {}).get(name) is not None:
                raise InvalidRequest(f"`structured_outputs.{name}` is not supported by this server",
                                     param=f"structured_outputs.{name}", code="unsupported_parameter")
        found += _guided(so.json_, so.regex, so.choice, so.grammar, "structured_outputs.{}")
        if so.json_object:
            found.append(GrammarSpec("json_object", "", "structured_outputs.json_object"))
    if len(found) > 1:
        raise InvalidRequest("ask for one kind of structured output: " + ", ".join(s.param for s in found),
                             param=found[1].param)
    return found[0] if found else None


@dataclass(frozen=True)
class ToolCallPlan:
    """How a chat reply becomes tool calls: `name` is the named function (the row generates its
    arguments), or None for `"required"` (the row generates a JSON array of `{"name", "parameters"}`)."""

    name: str | None


def tool_plan(req: ChatCompletionRequest) -> tuple[ToolCallPlan | None, dict[str, Any] | None]:
    """The tool-call plan and the JSON schema the reply is generated under, or (None, None) when
    the reply is text (`tool_choice` none/auto, or no tools)."""
    choice = req.tool_choice
    if req.tools is None or choice in (None, "none", "auto"):
        if choice is not None and choice not in ("none", "auto") and not req.tools:
            raise InvalidRequest("tool_choice needs `tools`", param="tool_choice")
        return None, None
    schemas = {t.function.name: _parameters(t.function.parameters) for t in req.tools}
    if choice == "required":  # vLLM's schema for "required" (each item names its tool by an enum)
        options = [{"properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
                    "required": ["name", "parameters"], "additionalProperties": False}
                   for name, params in schemas.items()]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options}}
        if req.parallel_tool_calls is False:
            array["maxItems"] = 1
        return ToolCallPlan(None), array
    assert not isinstance(choice, str)
    name = choice.function.name
    if name not in schemas:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not among `tools`", param="tool_choice")
    return ToolCallPlan(name), schemas[name]


def _parameters(schema: dict[str, Any] | None) -> dict[str, Any]:
    return schema if schema else {"type": "object", "properties": {}}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls(plan: ToolCallPlan, text: str) -> list[dict[str, Any]]:
    """The `tool_calls` of a finished reply's text (JSON under the plan's schema)."""
    if plan.name is not None:
        return [{"id": call_id(), "type": "function", "function": {"name": plan.name, "arguments": text}}]
    calls = CallReader()
    found = calls.feed(text)
    if not found:  # cut short by max_tokens before one call was complete: hand back what there is
        return [{"id": call_id(), "type": "function", "function": {"name": "", "arguments": text}}]
    return found


class CallReader:
    """Reads `"required"`'s JSON array of calls as its text streams in and hands out each call
    once its object is complete, so a stream can send every call as soon as it exists."""

    def __init__(self) -> None:
        self.text, self.pos = "", 0
        self.sent = 0  # calls a stream has sent so far
        self._decoder = json.JSONDecoder()

    def feed(self, more: str) -> list[dict[str, Any]]:
        """The calls completed by `more` (OpenAI `tool_calls` entries, arguments as JSON text)."""
        self.text += more
        out: list[dict[str, Any]] = []
        while True:
            pos = self.pos
            while pos < len(self.text) and self.text[pos] in "[, \n\t\r":
                pos += 1
            if pos >= len(self.text) or self.text[pos] != "{":
                return out
            try:
                item, end = self._decoder.raw_decode(self.text, pos)
            except ValueError:  # the object is not complete yet
                return out
            self.pos = end
            if isinstance(item, dict):
                out.append({"id": call_id(), "type": "function",
                            "function": {"name": str(item.get("name", "")),
                                         "arguments": json.dumps(item.get("parameters", {}))}})


def row_grammars(spec: GrammarSpec | None, state: Services, rows: int) -> list[RowGrammar | None]:
    """One matcher per row (compiled once); 400 for a spec that cannot compile."""
    if spec is None:
        return [None] * rows
    compiled = compiler(state).compile(spec)
    return [RowGrammar(compiled) for _ in range(rows)]
