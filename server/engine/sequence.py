"""One request inside the engine: what it asked, how far it got, and (in `route`) what routing keeps.

`Sequence` holds what the request asked (prompt, sampling, stop criteria, routing spec, the
callbacks that detokenise and deliver its tokens, its deadline) and its progress (tokens, text,
stop handling, how it ended). The gates in force and the rest of the routing state live apart,
in `Sequence.route` (`server.engine.route_state.RouteState`).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.engine.grammar import RowGrammar
from server.engine.prompt_logprobs import PromptScores
from server.engine.registry import AdapterRegistry, AdapterVersion
from server.engine.route_state import RouteState
from server.engine.sampling import SamplingParams, Top

_ids = itertools.count(1)
_release_lock = threading.Lock()


@dataclass(frozen=True)
class RoutingSpec:
    """How a request picks its gates. `fixed` covers one adapter, a manual mixture, and the base
    model (empty weights); `auto` asks a router, again every `reroute_every` tokens."""

    mode: str  # "fixed" | "auto"
    weights: dict[str, float] = field(default_factory=dict)
    router: str | None = None
    reroute_every: int = 2
    top_k: int | None = None
    temperature: float | None = None
    # (top_k, temperature) when the router gates per token inside the layers (Arrow); None: row gates
    per_token: tuple[int, float] | None = None


@dataclass
class TokenEvent:
    seq_id: int
    token_index: int
    token_id: int | None
    text: str
    logprob: float | None
    weights: dict[str, float]
    finish_reason: str | None = None
    error: Exception | None = None
    top: Top | None = None  # the top-N alternatives, when the request asked for log-probs


@dataclass
class Sequence:
    # what the request asked
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    routing: RoutingSpec
    decode: Callable[[list[int]], str]
    emit: Callable[[TokenEvent], None]
    stop: tuple[str, ...] = ()
    eos_token_id: int | None = None
    prompt_text: str = ""
    deadline: float | None = None  # time.monotonic() after which the engine ends it with a timeout
    prompt_logprobs: int | None = None  # score the prompt (echo + logprobs) with this many alternatives
    include_stop_str: bool = False  # vLLM's include_stop_str_in_output: the stop string stays in the text
    grammar: RowGrammar | None = None  # structured output: the row's grammar matcher (engine/grammar.py)
    id: int = field(default_factory=lambda: next(_ids))
    versions: dict[str, AdapterVersion] = field(default_factory=dict)  # held references
    # what routing keeps: the gates in force, the route vector, the routing window's hidden states
    route: RouteState = field(default_factory=RouteState)
    # progress, and how it ended
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0
    finish_reason: str | None = None
    error: Exception | None = None  # why the engine ended it, told to the client with its last event
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    generator: torch.Generator | None = field(init=False, default=None)
    # the same seed on the device, for the batched device sampler (made on first use, on CUDA)
    device_generator: torch.Generator | None = field(init=False, default=None)
    references_released: bool = field(init=False, default=False)
    prompt_scores: PromptScores | None = None  # set before the first event is emitted

    def __post_init__(self) -> None:
        self.generator = self.sampling.make_generator()

    def release_references(self, registry: AdapterRegistry) -> None:
        """Give back the adapter references this sequence holds, exactly once. The request owns
        them until the engine accepts the sequence, the engine after that; whichever owner ends
        it calls this (in a `finally`), and a second call is a no-op rather than a double release."""
        with _release_lock:
            if self.references_released:
                return
            self.references_released = True
        registry.release(list(self.versions.values()))

    @property
    def position(self) -> int:
        """Tokens already in the KV cache (the last generated token is not yet fed back)."""
        return len(self.prompt_ids) + max(len(self.generated) - 1, 0)

    def context_text(self, window: int | None = None) -> str:
        """The text a router sees: prompt + generated so far, or only its last `window` tokens
        (the same window the `base` embedder pools over, so both embedders follow a topic change)."""
        if window is None:
            return self.prompt_text + self.text
        return self.decode((self.prompt_ids + self.generated)[-window:])

    def push_token(self, token: int, max_positions: int) -> str:
        """Record a sampled token; returns the text that is now safe to emit (stop strings held back)."""
        self.generated.append(token)
        grammar_done = self.grammar is not None and self.grammar.done  # its stop token ends it, ignore_eos or not
        if (token == self.eos_token_id and not self.sampling.ignore_eos) or token in self.sampling.stop_token_ids \
                or grammar_done:
            self.text = self.decode(self.generated[:-1])  # the stop token itself is not part of the text
            self.finish_reason = "stop"
            return self._flush()
        text = self.decode(self.generated)
        if text.endswith("\ufffd") and len(self.generated) < self.max_tokens:
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.text = text
        if self.stop and len(self.generated) >= self.sampling.min_tokens:  # vLLM: no stop before min_tokens
            start = max(0, self.emitted_chars - max(len(s) for s in self.stop))
            hits = [(i, len(s)) for i, s in ((self.text.find(s, start), s) for s in self.stop) if i >= 0]
            if hits:
                at, length = min(hits)
                self.text = self.text[: at + length if self.include_stop_str else at]
                self.finish_reason = "stop"
                return self._flush()
        if len(self.generated) >= self.max_tokens or len(self.prompt_ids) + len(self.generated) >= max_positions:
            self.finish_reason = "length"
            return self._flush()
        hold = max((len(s) for s in self.stop), default=1) - 1
        safe = max(self.emitted_chars, len(self.text) - hold)
        delta, self.emitted_chars = self.text[self.emitted_chars:safe], safe
        return delta

    def _flush(self) -> str:
        delta, self.emitted_chars = self.text[self.emitted_chars:], len(self.text)
        return delta

    def segments(self) -> list[dict]:
        """Routing trace as segments: consecutive tokens with the same weights merged."""
        return self.route.trace.segments(end_token=len(self.generated))
