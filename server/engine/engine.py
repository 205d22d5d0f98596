"""The engine: a step function over a batch that sequences join and leave between tokens.

Each `step()` (TGI/LoRAX style) admits waiting sequences (prefill, first token), then runs one
batched decode step for every running sequence, each row with its own gates. Re-routing happens
at the start of a step for the rows that are due, from hidden states the previous steps already
computed (or the text so far, for a sentence encoder), so it costs no extra forward pass.
Only the engine thread calls `step()`; other threads talk to it through `submit()`/`cancel()`.
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

from server.engine import gpt2
from server.engine.base_model import LORA_TARGETS, ResidentModel
from server.engine.errors import ContextTooLong, Overloaded, SwitchboardError, Unavailable
from server.engine.kv_cache import KVCache
from server.engine.logprobs import score_prompt
from server.engine.lora_layer import LoRABatchContext, wrap_targets
from server.engine.registry import AdapterRegistry, AdapterVersion
from server.engine.sampling import Pick, sample_batch
from server.engine.sequence import Sequence, TokenEvent
from server.engine.slots import SlotManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_loras: int = 16
    max_batch_size: int = 32
    max_queue: int = 256
    hidden_window: int | None = 32


class GateSource(Protocol):
    """Computes routed gates; implemented by the server's routing service."""

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
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled")
        for seq in [s for s in self.running if s.cancelled]:
            self._leave(seq, "cancelled")

    # -- gates ----------------------------------------------------------------------------------------
    def _route(self, seqs: list[Sequence]) -> None:
        """Recompute gates for `seqs` (auto-routed rows that are due), taking the results of
        re-routes started a step early where there are some."""
        if not seqs or self.gate_source is None:
            return
        now = [s for s in seqs if s.id not in self._prefetched]
        for seq in seqs:
            if seq.id in self._prefetched:
                future, i = self._prefetched.pop(seq.id)
                proposals, elapsed = future.result()
                self._apply_route(seq, proposals[i], elapsed)
        if now:
            proposals, elapsed = _timed_route(self.gate_source, now, None)
            for seq, weights in zip(now, proposals, strict=True):
                self._apply_route(seq, weights, elapsed)

    def _apply_route(self, seq: Sequence, weights: dict[str, float], elapsed: float) -> None:
        before = seq.top_adapter if seq.gates else None
        seq.gates = weights
        switched = before is not None and seq.top_adapter != before
        seq.reroutes += 1
        if self.observer:
            self.observer.on_route(seq, weights, switched, elapsed)

    def _prefetch_routes(self) -> None:
        """Start, on the side thread, the text-encoder re-routes that fall due at the next step."""
        source = self.gate_source
        if source is None:
            return
        upcoming = [s for s in self.running if s.routing.mode == "auto" and s.routing.reroute_every > 0
                    and (len(s.generated) + 1) % s.routing.reroute_every == 0
                    and s.id not in self._prefetched and not source.needs_hidden(s)]
        if upcoming:
            contexts = source.contexts(upcoming)  # snapshot now: the engine thread appends tokens
            future = self._router_pool.submit(_timed_route, source, upcoming, contexts)
            for i, seq in enumerate(upcoming):
                self._prefetched[seq.id] = (future, i)

    def _set_gates(self, seqs: list[Sequence]) -> None:
        """Point the LoRA layers at the slots these rows use, with a [B, active] gate matrix."""
        versions: list[AdapterVersion] = []
        column: dict[int, int] = {}
        for seq in seqs:
            for name, w in seq.gates.items():
                v = seq.versions[name]
                if w != 0.0 and id(v) not in column:
                    column[id(v)] = len(versions)
                    versions.append(v)
        if not versions:
            self.ctx.clear()
            return
        slots = self.slots.ensure(versions)
        gates = torch.zeros(len(seqs), len(versions), dtype=self.resident.dtype)  # [B, active]
        for row, seq in enumerate(seqs):
            for name, w in seq.gates.items():
                if w != 0.0:
                    gates[row, column[id(seq.versions[name])]] = w
        used = gates.ne(0).any(dim=1)  # [B]
        rows = None if bool(used.all()) else used.nonzero().flatten().to(self.resident.device)
        self.ctx.set(tuple(slots), gates.to(self.resident.device), rows)

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
        except SwitchboardError as e:
            if len(batch) == 1:
                self._fail(batch[0], e)
                return
            for seq in batch:
                try:
                    self._prefill([seq])
                except SwitchboardError as one:
                    self._fail(seq, one)

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
        row = len(self.running)
        need = max(min(len(s.prompt_ids) + s.max_tokens, self.resident.max_positions) for s in seqs)
        self.cache.reserve(row + len(seqs), need)
        window = self.config.hidden_window
        embed = [s for s in seqs if s.routing.mode == "auto" and self.gate_source is not None
                 and self.gate_source.needs_hidden(s)]
        if embed:
            for seq in embed:
                seq.hidden_tail = None  # a retried admission starts its window afresh
            # The router embeds the base model's view of the prompt's last `window` tokens: one
            # ungated pass over just those (into rows the real prefill overwrites below).
            self.ctx.clear()
            tails = [s.prompt_ids[-window:] if window else s.prompt_ids for s in embed]
            ids, pos, _ = self._padded(tails)
            hidden = self._hidden(ids, pos, row)  # [b, Tw, d]
            for i, seq in enumerate(embed):
                seq.keep_hidden(hidden[i, : len(tails[i])], window)
        for seq in seqs:
            if seq.routing.mode != "auto":
                seq.gates = dict(seq.routing.weights)
        self._route([s for s in seqs if s.routing.mode == "auto"])
        self._set_gates(seqs)
        ids, pos, last = self._padded([s.prompt_ids for s in seqs])
        logits, hidden = self._forward(ids, pos, row, last)  # [B, V], [B, T, d]
        choices = self._sample(seqs, logits)
        finished = []
        for i, seq in enumerate(seqs):
            if seq.hidden_tail is None:
                seq.keep_hidden(hidden[i, : len(seq.prompt_ids)], window)
            if seq.prompt_logprobs is not None:
                seq.prompt_scores = score_prompt(self.resident.model, hidden[i, : len(seq.prompt_ids)],
                                                 seq.prompt_ids, seq.prompt_logprobs)
            self.running.append(seq)
            if seq.max_tokens == 0 or self._accept(seq, choices[i]):  # max_tokens 0: only scoring the prompt
                finished.append(seq)
        for seq in finished:
            self._leave(seq, seq.finish_reason or ("error" if seq.error else "length" if seq.max_tokens == 0 else "stop"))

    def _decode(self) -> None:
        due = [s for s in self.running if s.routing.mode == "auto" and s.routing.reroute_every > 0
               and len(s.generated) % s.routing.reroute_every == 0]
        self._route(due)
        self._set_gates(self.running)
        self._prefetch_routes()
        ids = torch.tensor([[s.generated[-1]] for s in self.running], device=self.resident.device)  # [B, 1]
        pos = torch.tensor([[s.position] for s in self.running], device=self.resident.device)  # [B, 1]
        logits, hidden = self._forward(ids, pos, 0)  # [B, V], [B, 1, d]
        choices = self._sample(self.running, logits)
        finished = []
        for row, seq in enumerate(self.running):
            seq.keep_hidden(hidden[row], self.config.hidden_window)
            if self._accept(seq, choices[row]):
                finished.append(seq)
        # Leave only after every row took its token: moving a row into a hole copies its cache up
        # to its position, which must already count the key/value this step just wrote.
        for seq in finished:
            self._leave(seq, seq.finish_reason or ("error" if seq.error else "stop"))

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, row: int,
                 last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, V] of each row's last token and hidden states [B, T, d]."""
        logits, hidden = gpt2.forward(self.resident.model, ids, pos, self.cache, row_start=row, last=last)
        assert logits is not None
        return logits, hidden

    def _hidden(self, ids: torch.Tensor, pos: torch.Tensor, row: int) -> torch.Tensor:
        """Hidden states only (no LM head): the router's pass over the prompt."""
        return gpt2.forward(self.resident.model, ids, pos, self.cache, row_start=row, logits=False)[1]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Pick | SwitchboardError]:
        """Next token, its log-probability and the asked-for alternatives per row of `logits` [B, V]
        (or the error that failed that row alone)."""
        return sample_batch(logits, [s.sampling for s in seqs], [s.generator for s in seqs],
                            [(s.prompt_ids, s.generated) for s in seqs])

    def _accept(self, seq: Sequence, pick: Pick | SwitchboardError) -> bool:
        """Record and emit the chosen token; returns whether the sequence finished. A row whose
        sampling failed finishes with reason "error" carrying that error."""
        if isinstance(pick, SwitchboardError):
            seq.error = pick
            seq.finish_reason = None  # reported by `_finish`, with the error
            return True
        token, logprob, top = pick
        index = len(seq.generated)
        seq.trace.record(index, seq.gates)
        delta = seq.push_token(token, self.resident.max_positions)
        now = time.monotonic()
        if self.observer:  # before the timestamps move: it measures from the previous token
            self.observer.on_token(seq, now)
        seq.last_token_at = now
        seq.emit(TokenEvent(seq.id, index, token, delta, logprob, dict(seq.gates), seq.finish_reason, top=top))
        return seq.finish_reason is not None

    # -- leaving the batch -------------------------------------------------------------------------------
    def _leave(self, seq: Sequence, reason: str) -> None:
        row = self.running.index(seq)
        last = len(self.running) - 1
        if row != last:  # fill the hole with the last row so rows stay contiguous
            moved = self.running[last]
            self.cache.move_row(last, row, moved.position)
            self.running[row] = moved
        self.running.pop()
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        unreported = seq.finish_reason is None  # ended here, not by its own last token
        seq.finish_reason = seq.finish_reason or reason
        self._prefetched.pop(seq.id, None)
        self.registry.release(list(seq.versions.values()))
        if unreported:  # tell the waiting client, or it would wait for its timeout
            error = (seq.error or Unavailable("the engine failed while running this request; retry it")) \
                if reason == "error" else None
            seq.emit(TokenEvent(seq.id, len(seq.generated), None, "", None, dict(seq.gates), reason, error=error))
        if self.observer:
            self.observer.on_finish(seq)

    def _fail(self, seq: Sequence, error: SwitchboardError) -> None:
        seq.finish_reason = "error"
        self.registry.release(list(seq.versions.values()))
        seq.emit(TokenEvent(seq.id, len(seq.generated), None, "", None, {}, "error", error=error))

    @torch.inference_mode()  # compacting rows writes to cache tensors made in inference mode
    def shutdown(self, reason: str = "cancelled") -> None:
        """Cancel everything (graceful-shutdown deadline passed)."""
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get_nowait())
        for seq in list(self.waiting):
            self._finish(seq, reason)
        self.waiting.clear()
        for seq in list(self.running):
            self._leave(seq, reason)


def _timed_route(source: GateSource, seqs: list[Sequence],
                 contexts: list[str] | None) -> tuple[list[dict[str, float]], float]:
    """Route `seqs`; returns the weights and the seconds per decision (for the latency metric)."""
    start = time.perf_counter()
    proposals = source.route(seqs, contexts)
    return proposals, (time.perf_counter() - start) / len(seqs)

