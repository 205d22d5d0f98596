"""The one request lifecycle behind `/v1/completions` and `/v1/chat/completions`: the routes differ
only in how their body becomes a `CompletionRequest` and in the response's shape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from server.api import streaming
from server.api.deps import ReadyState
from server.api.schemas import CompletionRequest
from server.engine.errors import RequestTimeout, SwitchboardError
from server.serving import completion_service as completions
from server.serving import fair_pool
from server.state import Services


async def _build_off_loop(body: CompletionRequest, state: ReadyState, deadline: float) -> list[completions.Choice]:
    """Validate and tokenise on a worker thread (many long prompts take a while) so the event
    loop keeps serving; if the request is cancelled meanwhile, the references the thread took
    are released when it finishes."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(fair_pool.VALIDATE, completions.build_choices, body, state, loop, deadline)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        def cleanup(f: asyncio.Future) -> None:
            if not f.cancelled() and f.exception() is None:
                completions.release(f.result(), state)

        fut.add_done_callback(cleanup)
        raise


Finish = Callable[[CompletionRequest, list[completions.Choice], Services, Request], Awaitable[dict]]
Stream = Callable[[CompletionRequest, list[completions.Choice], Services, Request], AsyncIterator[str]]


async def serve(model: str, prepare: Callable[[], Awaitable[CompletionRequest]], finish: Finish, stream: Stream,
                state: Services, request: Request) -> Any:
    """The one request lifecycle behind `/v1/completions` and `/v1/chat/completions` (they differ
    only in how the request becomes a `CompletionRequest` and in the response's shape): build the
    rows off the event loop, submit them, then answer as a stream or a body, counting the outcome
    (including 499 for a client that left) in the requests metric exactly once."""
    label = model if model == "auto" or model in state.registry else "base"
    deadline = completions.request_deadline(request, state)
    try:
        async def start() -> tuple[CompletionRequest, list[completions.Choice]]:
            creq = await prepare()
            return creq, await _build_off_loop(creq, state, deadline)

        try:  # the request timeout counts from arrival: a heavy body cannot outlive it while validated
            creq, choices = await asyncio.wait_for(start(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise RequestTimeout("the request timed out before generation started (reading, validating and "
                                 "tokenising it took longer than the request timeout)") from None
        completions.submit(choices, state)
    except SwitchboardError as e:
        state.metrics.requests.labels("unknown" if e.status_code == 404 else label, str(e.status_code)).inc()
        raise
    if creq.stream:
        def cancel() -> None:
            for c in choices:
                if c.finish_reason is None:
                    state.worker.cancel(c.seq)

        def outcome(status: str) -> None:
            state.metrics.requests.labels(label, status).inc()

        return StreamingResponse(streaming.guarded(stream(creq, choices, state, request), cancel, outcome),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        result = await finish(creq, choices, state, request)
    except SwitchboardError as e:
        state.metrics.requests.labels(label, str(e.status_code)).inc()
        raise
    except completions.ClientGone:
        state.metrics.requests.labels(label, "499").inc()
        return Response(status_code=499)  # nobody is listening; the rows are already cancelled
    except asyncio.CancelledError:  # the server cancelled the handler (client gone): count it too
        state.metrics.requests.labels(label, "499").inc()
        raise
    state.metrics.requests.labels(label, "200").inc()
    return result
