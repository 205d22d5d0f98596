"""Tokenising with per-request fairness.

Tokenising is the heavy part of validating a request. On one shared FIFO pool a few heavy
bodies (many long prompts each) queue all their work ahead of a small request, which then waits
for all of it: 8 bodies of 40 × 100k-character prompts made a 2-token completion on another
connection take 16-32 s. Here each request's jobs wait in their own queue and the workers take
one job from each request in turn (round-robin, as a fair-queueing scheduler does), so a
request with one short prompt waits for at most one job per worker, however much the others
sent. Callers block until their job is done; they run on the validation threads
(`validation_executor`), which mostly wait and so can be many, while the CPU work runs on
`workers` threads.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class FairPool:
    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._cond = threading.Condition()
        self._queues: dict[Hashable, deque[tuple[Callable[..., Any], tuple, Future]]] = {}
        self._order: deque[Hashable] = deque()  # owners with queued jobs, in turn
        self._threads: list[threading.Thread] = []

    def run(self, owner: Hashable, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in `owner`'s turn and return its result (or raise its exception)."""
        fut: Future = Future()
        with self._cond:
            if len(self._threads) < self.workers:
                t = threading.Thread(target=self._work, name=f"tokenise-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
            queue = self._queues.get(owner)
            if queue is None:
                queue = self._queues[owner] = deque()
                self._order.append(owner)
            queue.append((fn, args, fut))
            self._cond.notify()
        return fut.result()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._order:
                    self._cond.wait()
                owner = self._order.popleft()
                queue = self._queues[owner]
                fn, args, fut = queue.popleft()
                if queue:
                    self._order.append(owner)  # its next job waits for everyone else's turn
                else:
                    del self._queues[owner]
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # the caller gets it; the worker goes on
                fut.set_exception(e)


TOKENISE = FairPool(os.cpu_count() or 1)
# Validation threads: they parse, check and wait for their turn on TOKENISE, so there are many
# (a FIFO pool of cpu + 4 threads would let 6 heavy bodies hold every one of them).
VALIDATE = ThreadPoolExecutor(max_workers=64, thread_name_prefix="validate")
