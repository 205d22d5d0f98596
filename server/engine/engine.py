"""The engine: a step function over a batch that sequences join and leave between tokens.

Each `step()` (TGI/LoRAX style) admits waiting sequences (prefill, first token), then runs one
batched decode step for every running sequence, each row with its own gates. Re-routing happens
at the start of a step for the rows that are due, from hidden states the previous steps already
computed (or the text so far, for a sentence encoder), so it costs no extra forward pass.
Only the engine thread calls `step()`; other threads talk to it through `submit()`/`cancel()`.

This module is the orchestration; the parts live beside it: the running rows and their cache
rows in `batch.py` (`Batch`, the gate matrix), when and how rows are routed in `route_step.py`,
what a row does with its logits in `tokens.py`, adapters still on disk read on a side thread
while their rows wait (`ParkedRows`) in `loader.py`. Each forward runs inside
`LoRABatchContext.applied`, so its gates never outlive it.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from server.engine import gpt2, quant, static_step
from server.engine.base_model import LORA_TARGETS, ResidentModel, int8_kernel
from server.engine.batch import Batch, Gates, gate_matrix, padded, per_token_rows, record_layer_weights
from server.engine.errors import (
    ContextTooLong,
    ModelLoadError,
    Overloaded,
    RequestTimeout,
    SwitchboardError,
    Unavailable,
)
from server.engine.kv_cache import KVCache
from server.engine.loader import FactorLoader, ParkedRows
from server.engine.lora_layer import LoRABatchContext, wrap_targets
from server.engine.prompt_logprobs import score_prompt
from server.engine.registry import AdapterRegistry
from server.engine.route_step import GateSource, RouteStep, is_due
from server.engine.sequence import Sequence, TokenEvent
from server.engine.slots import SlotManager
from server.engine.tokens import row_error, take_tokens

__all__ = ["Engine", "EngineConfig", "EngineObserver", "GateSource"]

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
    # allocate the KV cache for max_batch_size rows of the whole context up front, so it never
    # moves under CUDA graphs (None: on CUDA)
    full_cache: bool | None = None


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
        if resident.quant != "none":
            if config.decode_step != "eager":
                raise ModelLoadError(f"--quant {resident.quant} runs the eager decode step; use --compile off (or auto)")
            native = int8_kernel(resident.quant, resident.device)
            quant.quantize_model(resident.model, layers.values(), resident.quant, native)
            resident.quant_kernel = quant.kernel_name(resident.model)
        self.slots = SlotManager(layers, config.max_loras, resident.device, resident.dtype, registry.host)
        full = resident.device.type == "cuda" if config.full_cache is None else config.full_cache
        self.cache = KVCache(cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_positions,
                             resident.dtype, resident.device, rows=static_step.bucket(config.max_batch_size) if full else 4,
                             full=full)
        self.static = None if config.decode_step == "eager" else static_step.build(
            resident.model, self.cache, self.slots, self.ctx, compiled=config.decode_step == "compiled")
        self.inbox: queue.Queue[Sequence] = queue.Queue()
        self.waiting: deque[Sequence] = deque()
        self.batch = Batch(self.cache, resident.device)
        self.route_step = RouteStep(gate_source, observer.on_route if observer else None)
        # rows routed to adapters still on disk wait outside the batch while a side thread reads them
        self.loader = FactorLoader(registry.host, self.slots)
        self.parked = ParkedRows(self.loader, self._end)

    @property
    def running(self) -> list[Sequence]:
        """The running sequences in cache-row order (a copy; `batch` owns them)."""
        return self.batch.seqs

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
        return self.inbox.qsize() + len(self.waiting) + len(self.parked)

    def has_work(self) -> bool:
        return bool(self.batch or self.waiting or self.parked or not self.inbox.empty())

    def warm_up(self, fallback: bool = False) -> float:
        """Compile (or first-run) the static decode step for every batch bucket before serving;
        seconds taken (0 with the eager step). Call it on the thread that will run `step()` (the
        engine thread): CUDA graph trees keep per-thread state. `fallback` (`--compile auto`): a
        warm-up that fails logs why and decodes with the eager step instead of failing start-up."""
        if self.static is None:
            return 0.0
        try:
            return self.static.warm_up([1, self.config.max_batch_size])
        except Exception:
            if not fallback:
                raise
            log.exception("warming up the static decode step failed; decoding with the eager step")
            self.static = None
            return 0.0

    # -- the step function ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get_nowait())
        self.waiting.extendleft(reversed(self.parked.released()))  # back to the front, in their order
        self._drop_cancelled()
        self.slots.evict_retired()
        self._admit()
        if self.batch:
            self._decode()
        self.loader.prune()
        if self.parked and not self.batch and not self.waiting:
            self.loader.wait(0.005)  # nothing to compute until a read finishes
        if self.observer:
            self.observer.on_step(len(self.batch), self.queue_depth())

    def _drop_cancelled(self) -> None:
        """Drop cancelled rows, and end rows past their deadline with a timeout error (the
        deadline bounds a request's total time even while its tokens keep arriving)."""
        now = time.monotonic()
        for seq in [s for s in self.waiting if s.cancelled or _expired(s, now)]:
            self.waiting.remove(seq)
            self._end(seq, None if seq.cancelled else RequestTimeout("the request timed out"))
        for seq in [s for s in self.parked if s.cancelled or _expired(s, now)]:
            self.parked.remove(seq)
            self._end(seq, None if seq.cancelled else RequestTimeout("the request timed out"))
        for seq in [s for s in self.batch if s.cancelled or _expired(s, now)]:
            self._end(seq, None if seq.cancelled else RequestTimeout("the request timed out"))

    # -- prefill and decode ---------------------------------------------------------------------------
    def _admit(self) -> None:
        """Prefill the waiting sequences that fit, as one batch; a batch that fails (e.g. more
        adapters than slots) is retried one sequence at a time so one bad row fails alone."""
        seqs: list[Sequence] = []
        while self.waiting and len(self.batch) + len(seqs) < self.config.max_batch_size:
            seqs.append(self.waiting.popleft())
        if not seqs:
            return
        try:
            self._prefill(seqs)
        except Exception as e:
            if len(seqs) == 1:
                self._end(seqs[0], row_error(e, "prefill"))
                return
            log.warning("batched prefill of %d rows failed (%r); retrying them one at a time", len(seqs), e)
            for seq in seqs:
                try:
                    self._prefill([seq])
                except Exception as one:
                    self._end(seq, row_error(one, "prefill"))

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` as one batch. Everything up to the forward is shared (a failure raises,
        and `_admit` retries row by row); from sampling on each row is handled alone."""
        row = self.batch.reserve(seqs, self.resident.max_positions)
        # a row routed already (it waited for a read, or its batch failed after routing) keeps its decision
        embed = [s for s in seqs if self.route_step.embeds_hidden(s) and not s.route.reroutes]
        if embed:
            self._embed_prompts(embed, row)
        for seq in seqs:
            if seq.routing.mode != "auto":
                seq.route.gates = dict(seq.routing.weights)
        failed = self.route_step.route([s for s in seqs if s.routing.mode == "auto" and not s.route.reroutes])
        if failed:  # raise so that _admit retries alone: the rows whose routing works still run
            raise next(iter(failed.values()))
        window = self.config.hidden_window
        for seq in embed:  # re-routes pool the sliding window only
            if seq.route.hidden_tail is not None and window:
                seq.route.hidden_tail = seq.route.hidden_tail[-window:]
        seqs = self.parked.ready(seqs)
        if not seqs:
            return
        ids, pos, last = padded([s.prompt_ids for s in seqs], self.resident.device)
        with self._gated(seqs, [len(s.prompt_ids) for s in seqs]):
            logits, hidden = self._forward(ids, pos, row, last)  # [B, V], [B, T, d]
        self.batch.add(seqs)  # rows row.. of the cache are theirs from here on
        fresh: list[torch.Tensor | None] = [hidden[i, : len(seq.prompt_ids)] if seq.route.hidden_tail is None else None
                                            for i, seq in enumerate(seqs)]
        try:
            for i, seq in enumerate(seqs):  # echo + logprobs: the prompt's log-probs, from this same pass
                if seq.prompt_logprobs is not None:
                    try:
                        seq.prompt_scores = score_prompt(self.resident.model, hidden[i, : len(seq.prompt_ids)],
                                                         seq.prompt_ids, seq.prompt_logprobs)
                    except Exception as e:
                        self._end(seq, row_error(e, "scoring the prompt"))
            take = [i for i, seq in enumerate(seqs) if seq.max_tokens > 0 and seq in self.batch]
            if take:
                rows = logits if len(take) == len(seqs) else logits[take]
                self._take_tokens([seqs[i] for i in take], rows, [fresh[i] for i in take])
            for seq in seqs:  # max_tokens 0: only the prompt was wanted
                if seq.max_tokens == 0 and seq in self.batch:
                    self._leave(seq, "length")
        except Exception as e:  # these rows are running now: end them here, never retry them in _admit
            for seq in [s for s in seqs if s in self.batch]:
                self._end(seq, row_error(e, "prefill"))

    def _embed_prompts(self, seqs: list[Sequence], row: int) -> None:
        """The first decision embeds the base model's view of the prompt (its last
        `prompt_window` tokens): one ungated pass over those, into cache rows the real prefill
        overwrites. All of it is kept for this decision; `_prefill` then trims it to the window."""
        for seq in seqs:
            seq.route.hidden_tail = None  # a retried admission starts its window afresh
        first = self.config.prompt_window
        tails = [s.prompt_ids[-first:] if first else s.prompt_ids for s in seqs]
        ids, pos, _ = padded(tails, self.resident.device)
        with self.ctx.applied():
            hidden = self._hidden(ids, pos, row)  # [b, Tp, d]
        for i, seq in enumerate(seqs):
            seq.route.keep_hidden(hidden[i, : len(tails[i])], None)

    def _decode(self) -> None:
        due = [s for s in self.batch if is_due(s)]
        before = {s.id: s.route.gates for s in due}
        failed = self.route_step.route(due)
        for seq in [s for s in self.batch if s.id in failed]:  # before the forward: rows may move
            self._end(seq, row_error(failed[seq.id], "routing"))
        self.parked.hold(self.batch.seqs, before)
        if not self.batch:
            return
        seqs = self.batch.seqs
        self.route_step.prefetch(seqs)
        ids, pos = self.batch.decode_inputs()  # [B, 1] each
        try:
            with self._gated(seqs):
                logits, hidden = self._forward(ids, pos, 0)  # [B, V], [B, 1, d]
        except Exception as e:  # one row's gates or inputs broke the shared step: retry each alone
            log.warning("batched decode of %d rows failed (%r); retrying them one at a time", len(seqs), e)
            rows: list[torch.Tensor | Exception] = []
            tails: list[torch.Tensor | None] = []
            for row, seq in enumerate(seqs):
                try:
                    with self._gated([seq]):
                        one, h = self._forward(ids[row:row + 1], pos[row:row + 1], row)
                    rows.append(one[0])
                    tails.append(h[0])
                except Exception as err:
                    rows.append(err)
                    tails.append(None)
            self._take_tokens(seqs, rows, tails)
            return
        self._take_tokens(seqs, logits, list(hidden))

    def _gates(self, seqs: list[Sequence]) -> Gates:
        """The slots these rows use and their [B, active] gate matrix, for `ctx.applied`."""
        return gate_matrix(seqs, self.slots, self.resident.dtype, self.resident.device)

    @contextmanager
    def _gated(self, seqs: list[Sequence], lengths: list[int] | None = None) -> Iterator[None]:
        """Apply these rows' gates (and, for rows an Arrow router gates per token, their
        `ArrowRows`) for the forward inside the `with`; once it returns, those rows learn the
        mean weights their layers chose (for the trace)."""
        active, gates, rows = self._gates(seqs)
        arrow = per_token_rows(seqs, gates, self.resident.device, lengths)
        if arrow is not None:  # Arrow's prototypes are computed on the first step that needs them
            self.slots.ensure_prototypes(active)
        with self.ctx.applied(active, gates, rows, arrow):
            yield
        if arrow is not None:
            record_layer_weights(seqs, arrow, active, self.slots)

    def _take_tokens(self, seqs: list[Sequence], logits: torch.Tensor | list[torch.Tensor | Exception],
                     tails: list[torch.Tensor | None]) -> None:
        """Each row of `seqs` (all running, in cache-row order) takes its token (`tokens.take_tokens`);
        then the rows that failed or finished leave. Leave only after every row took its token:
        moving a row into a hole copies its cache up to its position, which must already count
        the key/value this step just wrote."""
        outcome = take_tokens(seqs, logits, tails, window=self.config.hidden_window,
                              max_positions=self.resident.max_positions,
                              on_token=self.observer.on_token if self.observer else None)
        for seq, error in zip(seqs, outcome, strict=True):
            if error is not None:
                self._end(seq, error)
            elif seq.finish_reason is not None:
                self._end(seq, None)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, row: int,
                 last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, V] of each row's last token and hidden states [B, T, d]. Each row's
        first position comes from the host (`gpt2.forward` would read it off `pos`: three host
        syncs on a GPU): 0 for a prefill (`last` given), else its sequence's position."""
        # a decode step; rows gated per token (Arrow) take the eager forward: the static step
        # has one gate row per sequence (docs/routing.md)
        if self.static is not None and ids.shape[1] == 1 and row == 0 and last is None and self.ctx.arrow is None:
            # rows 0..B-1 of the batch: their furthest position, from the host (no device read)
            n = ids.shape[0]
            return self.static.step(ids, pos, self.batch.top_position(n) if len(self.batch) >= n else None)
        starts: list[int] | None = [0] * ids.shape[0] if last is not None else \
            [s.position for s in self.batch.seqs[row:row + ids.shape[0]]]  # what decode_inputs sent as pos
        if starts is not None and len(starts) != ids.shape[0]:  # rows outside the batch: read them off pos
            starts = None
        logits, hidden = gpt2.forward(self.resident.model, ids, pos, self.cache, row_start=row, last=last,
                                      starts=starts)
        assert logits is not None
        return logits, hidden

    def _hidden(self, ids: torch.Tensor, pos: torch.Tensor, row: int) -> torch.Tensor:
        """Hidden states only (no LM head): the router's pass over the prompt."""
        return gpt2.forward(self.resident.model, ids, pos, self.cache, row_start=row, logits=False,
                            starts=[0] * ids.shape[0])[1]  # prompts from position 0

    # -- leaving the batch -------------------------------------------------------------------------------
    def _end(self, seq: Sequence, error: SwitchboardError | None) -> None:
        """End `seq` wherever it is: finished (its own finish reason), cancelled (no error, no
        finish reason) or failed with `error`, which its client receives."""
        if error is not None:
            seq.finish_reason, seq.error = "error", error
        reason = seq.finish_reason or "cancelled"
        if seq in self.batch:
            self._leave(seq, reason)
        else:
            self._finish(seq, reason)

    def _leave(self, seq: Sequence, reason: str) -> None:
        """Take `seq`'s row out of the batch (a failed row's leftovers scrubbed), then finish it."""
        self.batch.remove(seq, scrub=seq.error is not None)  # a failed row may have written NaN/inf
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """The one way out of the engine: references released (in a `finally`, whatever else
        fails), and the client told unless its own last token already did."""
        try:
            unreported = seq.finish_reason is None or seq.error is not None  # not ended by its own last token
            seq.finish_reason = seq.finish_reason or reason
            self.route_step.forget(seq)
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
        for seq in [*self.waiting, *self.parked]:
            self._finish(seq, reason)
        self.waiting.clear()
        self.parked.clear()
        for seq in self.batch.seqs:
            try:
                self._leave(seq, reason)
            except Exception:  # compacting failed: still end every row and release its references
                log.exception("could not compact row %s on shutdown", seq.id)
                self.batch.discard(seq)
                self._finish(seq, reason)


def _expired(seq: Sequence, now: float) -> bool:
    return seq.deadline is not None and now > seq.deadline
