"""How a stream ends: always with `data: [DONE]`, after an error event if it failed.

Once a streaming response has started, its status line (200) is sent; an exception escaping the
body would cut the connection with no explanation ("response already started"). `guarded`
turns every failure into an OpenAI-shaped error event followed by `[DONE]`, cancels the rows of
a stream that ends early, and reports the stream's real outcome ("200", the error's status, or
"499" when the client went away) for the request counter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from server.engine.errors import SwitchboardError
from server.serving.completion_service import ClientGone

log = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"


def error_chunk(message: str, error_type: str, param: str | None = None, code: str | None = None) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': error_type, 'param': param, 'code': code}})}\n\n"


async def guarded(body: AsyncIterator[str], cancel: Callable[[], None],
                  outcome: Callable[[str], None]) -> AsyncIterator[str]:
    """Relay `body`; on any failure send an error event and `[DONE]`; `cancel()` the stream's
    rows whenever it ends before its last token; `outcome(status)` exactly once, before the
    client can see the end of the stream (so a scrape right after `[DONE]` already counts it)."""
    reported = False

    def report(status: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            outcome(status)

    try:
        async for part in body:
            if part == DONE:
                report("200")
            yield part
        report("200")
    except SwitchboardError as e:
        report(str(e.status_code))
        yield error_chunk(e.message, e.error_type, e.param, e.code)
        yield DONE
    except ClientGone:  # nobody to tell
        pass
    except Exception as e:  # a bug: the client is still told, and the stream still ends properly
        log.exception("stream failed", exc_info=e)
        report("500")
        yield error_chunk("internal server error", "api_error", None, "internal_error")
        yield DONE
    finally:
        cancel()
        report("499")  # ended by the client (disconnect, cancellation) unless reported above
        if hasattr(body, "aclose"):
            await body.aclose()
