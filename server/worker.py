"""The engine thread: owns the model, runs `Engine.step()` while there is work, and runs
one-off jobs that need the model (e.g. embedding `examples` with the base embedder) between
steps, so torch work never blocks the event loop and never races a decode step."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from server.engine.engine import Engine
from server.engine.errors import Unavailable
from server.engine.sequence import Sequence

log = logging.getLogger(__name__)


class EngineWorker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.accepting = True
        self._thread = threading.Thread(target=self._run, name="switchboard-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        """The engine thread is running (a health check's question)."""
        return self._thread.is_alive()

    def submit(self, seq: Sequence) -> None:
        if not self.accepting:
            raise Unavailable("the server is shutting down")
        self.engine.submit(seq)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._wake.set()

    def run_soon(self, fn: Callable[[], Any]) -> Future:
        """Queue `fn` to run on the engine thread between steps; returns its future."""
        fut: Future = Future()
        self._jobs.put((fn, fut))
        self._wake.set()
        return fut

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps and await its result."""
        return await asyncio.wrap_future(self.run_soon(fn))

    def _run(self) -> None:
        while not self._stop.is_set():
            while not self._jobs.empty():
                fn, fut = self._jobs.get_nowait()
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the awaiting coroutine
                        fut.set_exception(e)
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception:  # a bug must not kill the engine thread silently
                    log.exception("engine step failed; cancelling the batch")
                    try:
                        self.engine.shutdown("error")
                    except Exception:  # keep the thread alive: later requests still get served
                        log.exception("cancelling the batch failed too")
            else:
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    async def drain(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish for `grace` seconds, cancel the rest."""
        self.accepting = False
        deadline = time.monotonic() + grace
        while self.engine.has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.has_work():
            await self.call(lambda: self.engine.shutdown("cancelled"))
        self._stop.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 5.0)
