"""From one forward's logits to each row's next token, every row on its own.

After a forward the batch's rows part ways: each row's logits are checked (NaN/inf fail that
row: its adapter mixture overflowed the serving dtype), sampled (a batched call that fails is
redone row by row), and its token recorded, run through stop strings and detokenising, and
emitted to its client. Whatever fails here fails its own row alone; `take_tokens` returns an
outcome per row and the engine ends the rows that failed or finished afterwards, once every row
has taken its token (moving a row into a hole copies its cache up to its position, which must
already count the key/value this step wrote).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from server.engine import device_sampling
from server.engine.errors import RowFailed, SwitchboardError, Unavailable, out_of_memory
from server.engine.grammar import mask_rows
from server.engine.sampling import Pick, Top, sample_batch
from server.engine.sequence import Sequence, TokenEvent

log = logging.getLogger(__name__)

OnToken = Callable[[Sequence, float], None]


def take_tokens(seqs: list[Sequence], logits: torch.Tensor | list[torch.Tensor | Exception],
                tails: list[torch.Tensor | None], *, window: int | None, max_positions: int,
                on_token: OnToken | None = None) -> list[SwitchboardError | None]:
    """Sample and accept one token per row of `seqs` from `logits` (per row: [V], or the error
    its forward raised), appending `tails` (per row: hidden states [T, d] of the tokens just
    processed, or None) to the row's routing window of `window` tokens. Returns per row the
    error it failed with, or None (it took its token; it may have finished)."""
    outcome: list[SwitchboardError | None] = [None] * len(seqs)
    if isinstance(logits, torch.Tensor):
        ok, block = list(range(len(seqs))), logits  # [B, V]
    else:
        for i, r in enumerate(logits):
            if isinstance(r, Exception):
                outcome[i] = row_error(r, "the forward pass")
        ok = [i for i, r in enumerate(logits) if not isinstance(r, Exception)]
        block = torch.stack([logits[i] for i in ok]) if ok else torch.empty(0)  # type: ignore[misc]
    if not ok:
        return outcome
    finite = finite_rows(block)  # [b]: NaN/inf logits fail their row alone
    good = [i for i, f in zip(ok, finite, strict=True) if f]
    for i, f in zip(ok, finite, strict=True):
        if not f:
            outcome[i] = RowFailed("the model produced non-finite logits for this request "
                                   "(its adapter mixture overflows the serving dtype)")
    if len(good) < len(ok):
        block = block[[ok.index(i) for i in good]]
    if any(seqs[i].grammar is not None for i in good):
        good, block = _mask(seqs, good, block, outcome)
    chosen = sample_rows([seqs[i] for i in good], block) if good else []
    for i, choice in zip(good, chosen, strict=True):
        seq = seqs[i]
        if isinstance(choice, Exception):
            outcome[i] = row_error(choice, "sampling")
            continue
        try:
            tail = tails[i]
            if tail is not None:
                seq.route.keep_hidden(tail, window)
            accept(seq, *choice, max_positions=max_positions, on_token=on_token)
        except Exception as e:
            outcome[i] = row_error(e, "handling its token (stop strings, detokenising)")
    return outcome


def finite_rows(block: torch.Tensor) -> list[bool]:
    """Whether each row of `block` [b, V] is free of NaN and inf. A row's sum is finite only if
    every value in it is (inf + x is inf or NaN, NaN + x is NaN), so one sum per row settles the
    usual case; the exact per-value check runs only when a sum is not finite (NaN/inf, or finite
    values large enough to overflow the sum). Why: `isfinite(block).all(-1)` builds a [b, V] bool
    tensor and reduces it, ~0.14 ms at one row and ~1.1 ms at eight (one thread), every step;
    the sum is 0.03-0.05 ms."""
    sums = block.sum(dim=-1, dtype=torch.float32).isfinite().tolist()  # fp16 sums overflow at 65504
    return sums if all(sums) else torch.isfinite(block).all(dim=-1).tolist()


# The batched device sampler (`device_sampling`) serves the rows it can on CUDA; tests set this
# to take it on CPU as well. Everywhere else the CPU path (`sampling.sample_batch`) is unchanged.
DEVICE_SAMPLING_ON_CPU = False


def _mask(seqs: list[Sequence], good: list[int], block: torch.Tensor,
          outcome: list[SwitchboardError | None]) -> tuple[list[int], torch.Tensor]:
    """Structured output: the constrained rows' grammar masks on their logits (free rows are
    untouched). If filling the masks fails, the constrained rows fail and the free rows go on."""
    try:
        return good, mask_rows(block, [seqs[i].grammar for i in good])
    except Exception as e:
        keep = []
        for j, i in enumerate(good):
            if seqs[i].grammar is None:
                keep.append(j)
            else:
                outcome[i] = row_error(e, "structured-output masking")
        return [good[j] for j in keep], block[keep]


def sample_rows(seqs: list[Sequence], logits: torch.Tensor) -> list[Pick | Exception]:
    """Next token and its log-probability per row of `logits` [B, V]: on CUDA the rows without
    penalties in one batched pass on the device (`device_sampling`), the others (and every row
    elsewhere) on the CPU path below."""
    if logits.device.type == "cuda" or DEVICE_SAMPLING_ON_CPU:
        on_device = [i for i, s in enumerate(seqs) if device_sampling.eligible(s.sampling)]
        if on_device:
            out: list[Pick | Exception | None] = [None] * len(seqs)
            for i, pick in zip(on_device, _sample_on_device([seqs[i] for i in on_device], logits[on_device]),
                               strict=True):
                out[i] = pick
            rest = [i for i in range(len(seqs)) if out[i] is None]
            if rest:
                for i, pick in zip(rest, _sample_on_cpu([seqs[i] for i in rest], logits[rest]), strict=True):
                    out[i] = pick
            return [o for o in out if o is not None]
    return _sample_on_cpu(seqs, logits)


def _sample_on_device(seqs: list[Sequence], logits: torch.Tensor) -> list[Pick | Exception]:
    """The batched device pass; if it fails, each row alone (a row that still fails gets its
    error). Generators are snapshot first, so a retried row draws what it would have drawn."""
    for seq in seqs:
        if seq.device_generator is None and seq.generator is not None:
            seq.device_generator = device_sampling.device_generator(seq.generator.initial_seed(), logits.device)
    states = [s.device_generator.get_state() if s.device_generator is not None else None for s in seqs]
    try:
        return list(device_sampling.sample_on_device(logits, [s.sampling for s in seqs],
                                                     [s.device_generator for s in seqs]))
    except Exception:
        out: list[Pick | Exception] = []
        for i, (seq, state) in enumerate(zip(seqs, states, strict=True)):
            if seq.device_generator is not None and state is not None:
                seq.device_generator.set_state(state)
            try:
                out.append(device_sampling.sample_on_device(logits[i:i + 1], [seq.sampling], [seq.device_generator])[0])
            except Exception as e:
                out.append(e)
        return out


def _sample_on_cpu(seqs: list[Sequence], logits: torch.Tensor) -> list[Pick | Exception]:
    """`sampling.sample_batch` over the rows; if the batched call fails, each row is sampled
    alone and a row that still fails gets its error back."""
    states = [s.generator.get_state() if s.generator is not None else None for s in seqs]
    try:
        return list(sample_batch(logits, [s.sampling for s in seqs], [s.generator for s in seqs],
                                 [(s.prompt_ids, s.generated) for s in seqs]))
    except Exception:
        for seq, state in zip(seqs, states, strict=True):  # rows sampled before the failure: same draw again
            if seq.generator is not None and state is not None:
                seq.generator.set_state(state)
        out: list[Pick | Exception] = []
        for i, seq in enumerate(seqs):
            try:
                out.append(sample_batch(logits[i:i + 1], [seq.sampling], [seq.generator],
                                        [(seq.prompt_ids, seq.generated)])[0])
            except Exception as e:
                out.append(e)
        return out


def accept(seq: Sequence, token: int, logprob: float, top: Top | None = None, *, max_positions: int,
           on_token: OnToken | None = None) -> bool:
    """Record and emit the chosen token (with the alternatives the request asked for); returns
    whether the sequence finished."""
    index = len(seq.generated)
    if seq.grammar is not None:
        seq.grammar.accept(token)
    start, weights = seq.route.in_force(index, seq.routing.reroute_every)
    seq.route.trace.record(start, weights)
    delta = seq.push_token(token, max_positions)
    now = time.monotonic()
    if on_token:  # before the timestamps move: it measures from the previous token
        on_token(seq, now)
    seq.last_token_at = now
    shown = seq.route.layer_weights if seq.route.layer_weights is not None else seq.route.gates
    seq.emit(TokenEvent(seq.id, index, token, delta, logprob, dict(shown), seq.finish_reason, top=top))
    return seq.finish_reason is not None


def row_error(error: Exception, phase: str) -> SwitchboardError:
    """The error a row's client gets: an engine error as it is, anything else as `RowFailed`."""
    if isinstance(error, SwitchboardError):
        return error
    if out_of_memory(error):  # the OS refused memory: retryable
        log.warning("one row ran out of host memory during %s: %r", phase, error)
        return Unavailable(f"the server ran out of memory during {phase}; retry the request")
    return RowFailed(f"this request failed in the engine during {phase}: {type(error).__name__}: {str(error)[:200]}")
