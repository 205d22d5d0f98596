"""Log-probabilities in OpenAI's two response shapes, collected token by token as events arrive.

Completions (`logprobs: N`): `tokens`, `token_logprobs`, `top_logprobs` (a dict per position of
the N most likely tokens plus the chosen one, as OpenAI and vLLM return it) and `text_offset`
(each token's start in the returned text, counting the echoed prompt). With `echo`, the prompt's
tokens come first and the first one's log-prob and alternatives are null.
Chat (`logprobs: true`, `top_logprobs: N`): `{"content": [{token, logprob, bytes, top_logprobs}]}`.
vLLM's `prompt_logprobs: N` (both endpoints): per prompt position a dict of token id →
`{logprob, rank, decoded_token}` (`prompt_logprobs` below).
Log-probs are those of the distribution the token was chosen from after `logit_bias` and the
penalties, before temperature / top-k / top-p; -inf is reported as -9999.0 (JSON has no infinity).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine.prompt_logprobs import PromptScores
from server.engine.sampling import Top

Entry = tuple[int, float | None, Top | None]  # token id, its log-prob, the alternatives


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


@dataclass
class LogprobTrack:
    """One choice's tokens with their log-probs; `sent`/`offset` track what a stream has sent."""

    entries: list[Entry] = field(default_factory=list)
    sent: int = 0
    offset: int = 0

    def add_prompt(self, ids: list[int], scores: PromptScores, n: int) -> None:
        """The prompt's tokens with their `n` most likely alternatives (the engine may have
        scored more, for `prompt_logprobs`)."""
        tops = [None if top is None else top[:n] for top in scores.top]
        self.entries.extend(zip(ids, scores.logprobs, tops, strict=True))

    def add(self, token_id: int, logprob: float | None, top: Top | None) -> None:
        self.entries.append((token_id, logprob, top))

    def unsent(self) -> list[Entry]:
        out, self.sent = self.entries[self.sent:], len(self.entries)
        return out


def completion_logprobs(decode: Any, entries: list[Entry], offset: int = 0) -> tuple[dict, int]:
    """OpenAI completions `logprobs` for `entries`, the first starting at text `offset`;
    returns it and the offset after the last token. `decode` maps a token id to its text."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, lp, top in entries:
        text = decode(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        lps.append(None if lp is None else _finite(lp))
        if lp is None:
            tops.append(None)
        else:
            alternatives = {decode(i): _finite(v) for i, v in top or ()}
            alternatives[text] = _finite(lp)  # the chosen token is always there (and wins a text clash)
            tops.append(alternatives)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, offset


@functools.cache
def _byte_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2's table,
    "Language Models are Unsupervised Multitask Learners", Radford et al. 2019)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer: Any) -> Callable[[int], bytes]:
    """A token's raw bytes. For a byte-level BPE (GPT-2's) these are exact even for a token that
    holds part of a UTF-8 character (whose decoded text is only "\ufffd"); otherwise the UTF-8 of
    its decoded text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
    table = _byte_table()

    def one(token_id: int) -> bytes:
        piece = tokenizer.convert_ids_to_tokens(token_id) if byte_level else None
        if isinstance(piece, str) and piece and token_id not in tokenizer.all_special_ids \
                and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return str(tokenizer.decode([token_id])).encode("utf-8")

    return one


def chat_logprobs(decode: Any, entries: list[Entry], to_bytes: Callable[[int], bytes] | None = None) -> dict:
    """OpenAI chat `logprobs`: per token its text, log-prob, bytes and the top-N alternatives."""

    def one(token_id: int, lp: float) -> dict:
        text = decode(token_id)
        raw = to_bytes(token_id) if to_bytes is not None else text.encode("utf-8")
        return {"token": text, "logprob": _finite(lp), "bytes": list(raw)}

    return {"content": [{**one(t, lp if lp is not None else 0.0),
                         "top_logprobs": [one(i, v) for i, v in top or ()]} for t, lp, top in entries]}


def prompt_logprobs(decode: Any, ids: list[int], scores: PromptScores, n: int) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per position a dict keyed
    by token id (a string in JSON) → `{logprob, rank, decoded_token}` holding the prompt's own
    token (its rank among all tokens) and the `n` most likely (ranks 1..n), the prompt's token
    first; a token that is both keeps its top-n entry, as vLLM builds the dict."""
    out: list[dict[str, dict] | None] = []
    for token_id, lp, top, rank in zip(ids, scores.logprobs, scores.top, scores.ranks, strict=True):
        if lp is None:
            out.append(None)
            continue
        entry = {str(token_id): {"logprob": _finite(lp), "rank": rank, "decoded_token": decode(token_id)}}
        for r, (i, v) in enumerate((top or ())[:n], start=1):
            entry[str(i)] = {"logprob": _finite(v), "rank": r, "decoded_token": decode(i)}
        out.append(entry)
    return out
