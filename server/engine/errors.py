"""The errors the engine and the services raise. Each carries the HTTP status and OpenAI error `type`/`code` it maps to,
so the single handler at the API edge can answer without knowing engine internals."""

from __future__ import annotations


class SwitchboardError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(SwitchboardError):
    code = "invalid_request"


class InvalidAdapter(SwitchboardError):
    code = "invalid_adapter"


class AdapterNotFound(SwitchboardError):
    """An unknown model or adapter name: one code, OpenAI's `model_not_found`, wherever a name is
    looked up (completions, chat, /v1/models/{id}, the admin routes); routers keep `router_not_found`."""

    status_code = 404
    error_type = "not_found_error"
    code = "model_not_found"


class Conflict(SwitchboardError):
    status_code = 409
    error_type = "conflict_error"
    code = "conflict"


class ContextTooLong(SwitchboardError):
    code = "context_length_exceeded"


class RequestTimeout(SwitchboardError):
    status_code = 504
    error_type = "timeout_error"
    code = "timeout"


class Overloaded(SwitchboardError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after: float = 1.0, **kw) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Unavailable(SwitchboardError):
    status_code = 503
    error_type = "service_unavailable"
    code = "unavailable"
    retry_after = 5.0


class RowFailed(SwitchboardError):
    """Handling one row of the batch failed (sampling, gates, stop strings, detokenising): that
    request alone ends with this error; the rest of the batch carries on."""

    status_code = 500
    error_type = "server_error"
    code = "row_failed"


class ModelLoadError(RuntimeError):
    """The base model could not be loaded at start-up (not a client error)."""


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the OS refusing memory (ENOMEM from malloc or mmap under a memory
    limit), however the layer that hit it wrapped it: torch's allocator and safetensors raise
    RuntimeError with the OS's message, C++ code `std::bad_alloc`."""
    if isinstance(error, MemoryError) or getattr(error, "errno", None) == 12:  # ENOMEM
        return True
    text = str(error)
    return any(s in text for s in ("Cannot allocate memory", "can't allocate memory", "std::bad_alloc"))
