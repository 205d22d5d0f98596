"""The engine: a step function over a batch that sequences join and leave between tokens.

Each `step()` (TGI/LoRAX style) admits waiting sequences (prefill, first token), then runs one
batched decode step for every running sequence, each row with its own gates. Re-routing happens
at the start of a step for the rows that are due, from hidden states the previous steps already
computed (or the text so far, for a sentence encoder), so it costs no extra forward pass.
Only the engine thread calls `step()`; other threads talk to it through `submit()`/`cancel()`.

Fault isolation: work on one row (its gates, sampling, stop strings, detokenising, emitting)
runs under a guard that fails that row alone (`RowFailed`); a failure in work shared by the
batch (routing, slots, the forward) retries the rows one at a time, so only the row that causes
it fails. Every way out of the engine goes through `_finish`, which releases the row's adapter
references in a `finally`.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from router_core.policy import reroute_due
from server.engine import gpt2, static_step
from server.engine.base_model import LORA_TARGETS, ResidentModel
from server.engine.errors import (
    ContextTooLong,
    Overloaded,
    RequestTimeout,
    RowFailed,
    SwitchboardError,
    Unavailable,
)
from server.engine.kv_cache import KVCache
from server.engine.logprobs import score_prompt
from server.engine.lora_layer import LoRABatchContext, wrap_targets
from server.engine.registry import AdapterRegistry, AdapterVersion
from server.engine.sampling import Pick, Top, sample_batch
from server.engine.sequence import Sequence, TokenEvent
from server.engine.slots import SlotManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_loras: int = 16
    max_batch_size: int = 32
    max_queue: int = 256
    hidden_window: int | None = 32
    # "eager": gpt2.forward; "static": the fixed-shape step (static_step) run eagerly;
    # "compiled": that step through torch.compile (CUDA graphs on GPU)
    decode_step: str = "eager"
    prompt_window: int | None = None  # prompt tokens the first decision pools (None = all)


class GateSource(Protocol):
    """Computes routed gates for the rows that are due; implemented by `server.gater.Gater`."""

    def needs_hidden(self, seq: Sequence) -> bool: ...

    def contexts(self, seqs: list[Sequence]) -> list[str]: ...

    def route(self, seqs: list[Sequence], contexts: list[str] | None = None) -> list[dict[str, float]]: ...


class EngineObserver(Protocol):
    def on_step(self, batch_size: int, queue_depth: int) -> None: ...

    def on_token(self, seq: Sequence, now: float) -> None: ...

    def on_route(self, seq: Sequence, weights: dict[str, float], switched: bool, seconds: float) -> None: ...

    def on_finish(self, seq: Sequence) -> None: ...


class Engine:
    def __init__(self, resident: ResidentModel, registry: AdapterRegistry, config: EngineConfig,
                 gate_source: GateSource | None = None, observer: EngineObserver | None = None) -> None:
        self.resident, self.registry, self.config = resident, registry, config
        self.gate_source, self.observer = gate_source, observer
        cfg = resident.model.config
        self.ctx = LoRABatchContext()
        layers = wrap_targets(resident.model, set(LORA_TARGETS), config.max_loras, self.ctx)
        self.slots = SlotManager(layers, config.max_loras, resident.device, resident.dtype)
        self.cache = KVCache(cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_positions,
                             resident.dtype, resident.device)
        self.static = None if config.decode_step == "eager" else static_step.build(
            resident.model, self.cache, self.slots, self.ctx, compiled=config.decode_step == "compiled")
        self.inbox: queue.Queue[Sequence] = queue.Queue()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i] owns cache row i
        # Text-encoder re-routes are started one step early on a side thread, overlapping the
        # decode forward (their context lacks the newest token): seq id -> (future, row in it).
        self._router_pool = ThreadPoolExecutor(1, thread_name_prefix="switchboard-router")
        self._prefetched: dict[int, tuple[Future, int]] = {}

    # -- called from other threads ------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        if self.queue_depth() >= self.config.max_queue:
            raise Overloaded(f"the request queue is full ({self.config.max_queue} waiting)", retry_after=1.0)
        room = self.resident.max_positions - (1 if seq.max_tokens else 0)  # a scoring-only row may fill the context
        if len(seq.prompt_ids) > room:
            raise ContextTooLong(
                f"the prompt has {len(seq.prompt_ids)} tokens; the model's context is {self.resident.max_positions}",
                param="prompt")
        self.inbox.put(seq)

    def queue_depth(self) -> int:
        return self.inbox.qsize() + len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or not self.inbox.empty())

    def warm_up(self) -> float:
        """Compile (or first-run) the static decode step for every batch bucket before serving;
        seconds taken (0 with the eager step). Call before the engine thread starts."""
        return self.static.warm_up([1, self.config.max_batch_size]) if self.static is not None else 0.0

    # -- the step function ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get_nowait())
        self._drop_cancelled()
        self.slots.evict_retired()
        self._admit()
        if self.running:
            self._decode()
        if self.observer:
            self.observer.on_step(len(self.running), self.queue_depth())

    def _drop_cancelled(self) -> None:
        """Drop cancelled rows, and end rows past their deadline with a timeout error (the
        deadline bounds a request's total time even while its tokens keep arriving)."""
        now = time.monotonic()
        for seq in [s for s in self.waiting if s.cancelled or _expired(s, now)]:
            self.waiting.remove(seq)
            self._end(seq, None if seq.cancelled else RequestTimeout("the request timed out"))
        for seq in [s for s in self.running if s.cancelled or _expired(s, now)]:
            self._end(seq, None if seq.cancelled else RequestTimeout("the request timed out"))

    # -- gates ----------------------------------------------------------------------------------------
    def _route(self, seqs: list[Sequence]) -> dict[int, Exception]:
        """Recompute gates for `seqs` (auto-routed rows that are due), taking the results of
        re-routes started a step early where there are some. A routing pass that fails is
        retried row by row; returns {seq id: error} for the rows that fail alone."""
        source = self.gate_source
        if not seqs or source is None:
            return {}
        now = [s for s in seqs if s.id not in self._prefetched]
        for seq in seqs:
            if seq.id in self._prefetched:
                future, i = self._prefetched.pop(seq.id)
                try:
                    proposals, elapsed = future.result()
                    self._apply_route(seq, proposals[i], elapsed)
                except Exception:  # the early pass failed: route this row now instead
                    now.append(seq)
        if not now:
            return {}
        try:
            proposals, elapsed = _timed_route(source, now, None)
            for seq, weights in zip(now, proposals, strict=True):
                self._apply_route(seq, weights, elapsed)
            return {}
        except Exception as e:
            if len(now) == 1:
                return {now[0].id: e}
        failed: dict[int, Exception] = {}
        for seq in now:
            try:
                proposals, elapsed = _timed_route(source, [seq], None)
                self._apply_route(seq, proposals[0], elapsed)
            except Exception as one:
                failed[seq.id] = one
        return failed

    def _apply_route(self, seq: Sequence, weights: dict[str, float], elapsed: float) -> None:
        switched = seq.route.apply(weights)
        if self.observer:
            self.observer.on_route(seq, weights, switched, elapsed)

    def _prefetch_routes(self) -> None:
        """Start, on the side thread, the text-encoder re-routes that fall due at the next step."""
        source = self.gate_source
        if source is None:
            return
        upcoming = [s for s in self.running if _reroute_due(s, ahead=1)
                    and s.id not in self._prefetched and not source.needs_hidden(s)]
        if upcoming:
            try:
                contexts = source.contexts(upcoming)  # snapshot now: the engine thread appends tokens
            except Exception:  # not fatal: these rows are routed on the engine thread when due
                return
            future = self._router_pool.submit(_timed_route, source, upcoming, contexts)
            for i, seq in enumerate(upcoming):
                self._prefetched[seq.id] = (future, i)

    def _gates(self, seqs: list[Sequence]) -> tuple[tuple[int, ...], torch.Tensor | None, torch.Tensor | None]:
        """The slots these rows use (filled here) and their [B, active] gate matrix, for `ctx.applied`."""
        versions: list[AdapterVersion] = []
        column: dict[int, int] = {}  # AdapterVersion.version -> column of the gate matrix
        for seq in seqs:
            for name, w in seq.route.gates.items():
                v = seq.versions[name]
                if w != 0.0 and v.version not in column:
                    column[v.version] = len(versions)
                    versions.append(v)
        if not versions:
            return (), None, None
        slots = self.slots.ensure(versions)
        gates = torch.zeros(len(seqs), len(versions), dtype=self.resident.dtype)  # [B, active]
        largest = torch.finfo(self.resident.dtype).max
        for row, seq in enumerate(seqs):
            for name, w in seq.route.gates.items():
                if not abs(w) <= largest:  # NaN or beyond the serving dtype: this row's fault
                    raise ValueError(f"gate {w!r} for adapter {name!r} is not finite in {self.resident.dtype}")
                if w != 0.0:
                    gates[row, column[seq.versions[name].version]] = w
        used = gates.ne(0).any(dim=1)  # [B]
        rows = None if bool(used.all()) else used.nonzero().flatten().to(self.resident.device)
        return tuple(slots), gates.to(self.resident.device), rows

    # -- prefill and decode ---------------------------------------------------------------------------
    def _admit(self) -> None:
        """Prefill the waiting sequences that fit, as one batch; a batch that fails (e.g. more
        adapters than slots) is retried one sequence at a time so one bad row fails alone."""
        batch: list[Sequence] = []
        while self.waiting and len(self.running) + len(batch) < self.config.max_batch_size:
            batch.append(self.waiting.popleft())
        if not batch:
            return
        try:
            self._prefill(batch)
        except Exception as e:
            if len(batch) == 1:
                self._end(batch[0], _row_error(e, "prefill"))
                return
            log.warning("batched prefill of %d rows failed (%r); retrying them one at a time", len(batch), e)
            for seq in batch:
                try:
                    self._prefill([seq])
                except Exception as one:
                    self._end(seq, _row_error(one, "prefill"))

    def _padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids [B, T], positions [B, T] and each row's last real index [B]. Pad tokens
        write keys/values past a row's end, which its later tokens overwrite before reading."""
        dev = self.resident.device
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, T]
        for row, p in enumerate(prompts):
            ids[row, : len(p)] = torch.tensor(p)
        pos = torch.arange(width).expand(len(prompts), width)  # [B, T]
        last = torch.tensor([len(p) - 1 for p in prompts])  # [B]
        return ids.to(dev), pos.to(dev), last.to(dev)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` as one batch. Everything up to the forward is shared (a failure raises,
        and `_admit` retries row by row); from sampling on each row is handled alone."""
        row = len(self.running)
        need = max(min(len(s.prompt_ids) + s.max_tokens, self.resident.max_positions) for s in seqs)
        self.cache.reserve(row + len(seqs), need)
        window = self.config.hidden_window
        embed = [s for s in seqs if s.routing.mode == "auto" and self.gate_source is not None
                 and self.gate_source.needs_hidden(s)]
        if embed:
            for seq in embed:
                seq.route.hidden_tail = None  # a retried admission starts its window afresh
            # The first decision embeds the base model's view of the prompt (its last
            # `prompt_window` tokens): one ungated pass over those, into rows the real prefill
            # overwrites below. All of it is kept for this decision; decode trims it to `window`.
            first = self.config.prompt_window
            tails = [s.prompt_ids[-first:] if first else s.prompt_ids for s in embed]
            ids, pos, _ = self._padded(tails)
            with self.ctx.applied():
                hidden = self._hidden(ids, pos, row)  # [b, Tp, d]
            for i, seq in enumerate(embed):
                seq.route.keep_hidden(hidden[i, : len(tails[i])], None)
        for seq in seqs:
            if seq.routing.mode != "auto":
                seq.route.gates = dict(seq.routing.weights)
        failed = self._route([s for s in seqs if s.routing.mode == "auto"])
        if failed:  # raise so that _admit retries alone: the rows whose routing works still run
            raise next(iter(failed.values()))
        for seq in embed:  # re-routes pool the sliding window only
            if seq.route.hidden_tail is not None and window:
                seq.route.hidden_tail = seq.route.hidden_tail[-window:]
        gates = self._gates(seqs)
        ids, pos, last = self._padded([s.prompt_ids for s in seqs])
        with self.ctx.applied(*gates):
            logits, hidden = self._forward(ids, pos, row, last)  # [B, V], [B, T, d]
        self.running.extend(seqs)  # rows row.. of the cache are theirs from here on
        fresh: list[torch.Tensor | None] = [hidden[i, : len(seq.prompt_ids)] if seq.route.hidden_tail is None else None
                                            for i, seq in enumerate(seqs)]
        try:
            for i, seq in enumerate(seqs):  # echo + logprobs: the prompt's log-probs, from this same pass
                if seq.prompt_logprobs is not None:
                    try:
                        seq.prompt_scores = score_prompt(self.resident.model, hidden[i, : len(seq.prompt_ids)],
                                                         seq.prompt_ids, seq.prompt_logprobs)
                    except Exception as e:
                        self._end(seq, _row_error(e, "scoring the prompt"))
            take = [i for i, seq in enumerate(seqs) if seq.max_tokens > 0 and seq in self.running]
            if take:
                rows = logits if len(take) == len(seqs) else logits[take]
                self._take_tokens([seqs[i] for i in take], rows, [fresh[i] for i in take])
            for seq in seqs:  # max_tokens 0: only the prompt was wanted
                if seq.max_tokens == 0 and seq in self.running:
                    self._leave(seq, "length")
        except Exception as e:  # these rows are running now: end them here, never retry them in _admit
            for seq in [s for s in seqs if s in self.running]:
                self._end(seq, _row_error(e, "prefill"))

    def _decode(self) -> None:
        due = [s for s in self.running if _reroute_due(s)]
        failed = self._route(due)
        for seq in [s for s in self.running if s.id in failed]:  # before the forward: rows may move
            self._end(seq, _row_error(failed[seq.id], "routing"))
        if not self.running:
            return
        self._prefetch_routes()
        seqs = list(self.running)
        ids = torch.tensor([[s.generated[-1]] for s in seqs], device=self.resident.device)  # [B, 1]
        pos = torch.tensor([[s.position] for s in seqs], device=self.resident.device)  # [B, 1]
        try:
            with self.ctx.applied(*self._gates(seqs)):
                logits, hidden = self._forward(ids, pos, 0)  # [B, V], [B, 1, d]
        except Exception as e:  # one row's gates or inputs broke the shared step: retry each alone
            log.warning("batched decode of %d rows failed (%r); retrying them one at a time", len(seqs), e)
            rows: list[torch.Tensor | Exception] = []
            tails: list[torch.Tensor | None] = []
            for row, seq in enumerate(seqs):
                try:
                    with self.ctx.applied(*self._gates([seq])):
                        one, h = self._forward(ids[row:row + 1], pos[row:row + 1], row)
                    rows.append(one[0])
                    tails.append(h[0])
                except Exception as err:
                    rows.append(err)
                    tails.append(None)
            self._take_tokens(seqs, rows, tails)
            return
        self._take_tokens(seqs, logits, list(hidden))

    def _take_tokens(self, seqs: list[Sequence], logits: torch.Tensor | list[torch.Tensor | Exception],
                     tails: list[torch.Tensor | None]) -> None:
        """Sample and accept one token per row of `seqs` (all running, in cache-row order) from
        `logits` (per row: [V], or the error its forward raised), appending `tails` (per row:
        hidden states [T, d] of the tokens just processed, or None). A row that fails ends alone."""
        outcome: list[SwitchboardError | None] = [None] * len(seqs)
        if isinstance(logits, torch.Tensor):
            ok, block = list(range(len(seqs))), logits  # [B, V]
        else:
            for i, r in enumerate(logits):
                if isinstance(r, Exception):
                    outcome[i] = _row_error(r, "the forward pass")
            ok = [i for i, r in enumerate(logits) if not isinstance(r, Exception)]
            block = torch.stack([logits[i] for i in ok]) if ok else torch.empty(0)  # type: ignore[misc]
        if ok:
            finite = torch.isfinite(block).all(dim=-1).tolist()  # [b]: NaN/inf logits fail their row alone
            good = [i for i, f in zip(ok, finite, strict=True) if f]
            for i, f in zip(ok, finite, strict=True):
                if not f:
                    outcome[i] = RowFailed("the model produced non-finite logits for this request "
                                           "(its adapter mixture overflows the serving dtype)")
            if len(good) < len(ok):
                block = block[[ok.index(i) for i in good]]
            chosen = self._sample([seqs[i] for i in good], block) if good else []
            for i, choice in zip(good, chosen, strict=True):
                seq = seqs[i]
                if isinstance(choice, Exception):
                    outcome[i] = _row_error(choice, "sampling")
                    continue
                try:
                    tail = tails[i]
                    if tail is not None:
                        seq.route.keep_hidden(tail, self.config.hidden_window)
                    self._accept(seq, *choice)
                except Exception as e:
                    outcome[i] = _row_error(e, "handling its token (stop strings, detokenising)")
        # Leave only after every row took its token: moving a row into a hole copies its cache up
        # to its position, which must already count the key/value this step just wrote.
        for seq, error in zip(seqs, outcome, strict=True):
            if error is not None:
                self._end(seq, error)
            elif seq.finish_reason is not None:
                self._end(seq, None)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, row: int,
                 last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, V] of each row's last token and hidden states [B, T, d]."""
        if self.static is not None and ids.shape[1] == 1 and row == 0 and last is None:  # a decode step
            return self.static.step(ids, pos)
        logits, hidden = gpt2.forward(self.resident.model, ids, pos, self.cache, row_start=row, last=last)
        assert logits is not None
        return logits, hidden

    def _hidden(self, ids: torch.Tensor, pos: torch.Tensor, row: int) -> torch.Tensor:
        """Hidden states only (no LM head): the router's pass over the prompt."""
        return gpt2.forward(self.resident.model, ids, pos, self.cache, row_start=row, logits=False)[1]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Pick | Exception]:
        """Next token and its log-probability per row of `logits` [B, V]; if the batched call
        fails, each row is sampled alone and a row that still fails gets its error back."""
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

    def _accept(self, seq: Sequence, token: int, logprob: float, top: Top | None = None) -> bool:
        """Record and emit the chosen token (with the alternatives the request asked for); returns
        whether the sequence finished."""
        index = len(seq.generated)
        seq.route.trace.record(index, seq.route.gates)
        delta = seq.push_token(token, self.resident.max_positions)
        now = time.monotonic()
        if self.observer:  # before the timestamps move: it measures from the previous token
            self.observer.on_token(seq, now)
        seq.last_token_at = now
        seq.emit(TokenEvent(seq.id, index, token, delta, logprob, dict(seq.route.gates), seq.finish_reason, top=top))
        return seq.finish_reason is not None

    # -- leaving the batch -------------------------------------------------------------------------------
    def _end(self, seq: Sequence, error: SwitchboardError | None) -> None:
        """End `seq` wherever it is: finished (its own finish reason), cancelled (no error, no
        finish reason) or failed with `error`, which its client receives."""
        if error is not None:
            seq.finish_reason, seq.error = "error", error
        reason = seq.finish_reason or "cancelled"
        if seq in self.running:
            self._leave(seq, reason)
        else:
            self._finish(seq, reason)

    def _leave(self, seq: Sequence, reason: str) -> None:
        row = self.running.index(seq)
        last = len(self.running) - 1
        kept = 0  # positions of `row` that hold a live sequence's keys/values after this
        if row != last:  # fill the hole with the last row so rows stay contiguous
            moved = self.running[last]
            self.cache.move_row(last, row, moved.position)
            self.running[row] = moved
            kept = moved.position
        self.running.pop()
        if seq.error is not None:  # a failed row may have written NaN/inf: scrub what it leaves
            self.cache.clear_row(row, kept)
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """The one way out of the engine: references released (in a `finally`, whatever else
        fails), and the client told unless its own last token already did."""
        try:
            unreported = seq.finish_reason is None or seq.error is not None  # not ended by its own last token
            seq.finish_reason = seq.finish_reason or reason
            self._prefetched.pop(seq.id, None)
            if unreported:  # tell the waiting client, or it would wait for its timeout
                error = seq.error
                if error is None and reason == "error":
                    error = Unavailable("the engine failed while running this request; retry it")
                try:
                    seq.emit(TokenEvent(seq.id, len(seq.generated), None, "", None, dict(seq.route.gates),
                                        seq.finish_reason, error=error))
                except Exception:  # the client's event loop is gone: nobody to tell
                    log.debug("could not deliver the end of request %s", seq.id, exc_info=True)
            if self.observer:
                self.observer.on_finish(seq)
        finally:
            seq.release_references(self.registry)

    @torch.inference_mode()  # compacting rows writes to cache tensors made in inference mode
    def shutdown(self, reason: str = "cancelled") -> None:
        """Cancel everything (graceful-shutdown deadline passed)."""
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get_nowait())
        for seq in list(self.waiting):
            self._finish(seq, reason)
        self.waiting.clear()
        for seq in list(self.running):
            try:
                self._leave(seq, reason)
            except Exception:  # compacting failed: still end every row and release its references
                log.exception("could not compact row %s on shutdown", seq.id)
                self.running.remove(seq)
                self._finish(seq, reason)


def _reroute_due(seq: Sequence, ahead: int = 0) -> bool:
    """Whether an auto-routed `seq` is re-routed before its next token (`ahead=1`: the one after)."""
    return seq.routing.mode == "auto" and reroute_due(len(seq.generated) + ahead, seq.routing.reroute_every)


def _expired(seq: Sequence, now: float) -> bool:
    return seq.deadline is not None and now > seq.deadline


def _row_error(error: Exception, phase: str) -> SwitchboardError:
    """The error a row's client gets: an engine error as it is, anything else as `RowFailed`."""
    if isinstance(error, SwitchboardError):
        return error
    log.warning("one row failed during %s: %r", phase, error)
    return RowFailed(f"this request failed in the engine during {phase}: {type(error).__name__}: {str(error)[:200]}")


def _timed_route(source: GateSource, seqs: list[Sequence],
                 contexts: list[str] | None) -> tuple[list[dict[str, float]], float]:
    """Route `seqs`; returns the weights and the seconds per decision (for the latency metric)."""
    start = time.perf_counter()
    proposals = source.route(seqs, contexts)
    return proposals, (time.perf_counter() - start) / len(seqs)

