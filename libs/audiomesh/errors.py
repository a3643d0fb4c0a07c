"""One small exception hierarchy; the gRPC layer maps each class to one status code.

Raise early, with a message that states the rule that was broken, e.g.
``InvalidInput("margin must be >= 1.0, got 0.5")``.
"""

from __future__ import annotations


class AudiomeshError(Exception):
    """Base class. ``code`` is the gRPC status code name this error maps to; ``reason``, when
    set, travels as a google.rpc.ErrorInfo detail so the HTTP facade can be more precise
    (e.g. 415 for audio it cannot decode, 413 for a too-large upload)."""

    code = "INTERNAL"
    reason: str | None = None


class InvalidInput(AudiomeshError):
    """The request or its audio breaks a documented rule (HTTP 400)."""

    code = "INVALID_ARGUMENT"


class UnsupportedAudio(InvalidInput):
    """The bytes are not audio any decoder here can read (HTTP 415)."""

    reason = "UNSUPPORTED_AUDIO"


class NotFound(AudiomeshError):
    """A job, object key, model or track does not exist (HTTP 404)."""

    code = "NOT_FOUND"


class AlreadyExists(AudiomeshError):
    code = "ALREADY_EXISTS"


class PreconditionFailed(AudiomeshError):
    """A conditional write lost: the object changed since it was read, or already exists
    (S3's 412; HTTP 409). Nothing was written; re-read and decide again."""

    code = "ABORTED"


class FailedPrecondition(AudiomeshError):
    """The request is valid but the system is not in a state to run it (HTTP 400)."""

    code = "FAILED_PRECONDITION"


class TooLarge(AudiomeshError):
    """An upload exceeds the configured size limit (HTTP 413)."""

    code = "RESOURCE_EXHAUSTED"
    reason = "TOO_LARGE"


class ResourceExhausted(AudiomeshError):
    """A bounded queue, rate or concurrency limit is full; retry later (HTTP 429).

    ``retry_after`` (seconds) travels as a google.rpc.RetryInfo detail (Retry-After in HTTP).
    """

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OutOfMemory(AudiomeshError):
    """A worker could not allocate what a request needed (MemoryError, torch's OOM).

    Not transient: the same request needs the same memory, so it is not retried (HTTP 429
    with reason OUT_OF_MEMORY; the message says what to lower)."""

    code = "RESOURCE_EXHAUSTED"
    reason = "OUT_OF_MEMORY"


def out_of_memory(exc: BaseException) -> OutOfMemory | None:
    """The OutOfMemory error for ``exc`` when it is an allocation failure, else None.

    Covers ``MemoryError`` (numpy's "Unable to allocate ...") and torch's
    ``OutOfMemoryError`` (a RuntimeError subclass; matched by name, torch is not imported here).
    """
    if isinstance(exc, OutOfMemory):
        return exc
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        detail = str(exc).splitlines()[0] if str(exc) else ""
        return OutOfMemory(
            f"out of memory ({type(exc).__name__}{': ' + detail if detail else ''}); not retried: lower the "
            "options that size the work (segment_seconds, shifts, hpss n_fft and kernel sizes) or give the "
            "worker more memory"
        )
    return None


class StoreFull(AudiomeshError):
    """The object store has no space left; nothing half-written was kept."""

    code = "RESOURCE_EXHAUSTED"
    reason = "STORE_FULL"


class Unauthenticated(AudiomeshError):
    """No API key, or one that is not known (HTTP 401)."""

    code = "UNAUTHENTICATED"


class Cancelled(AudiomeshError):
    """Work stopped because its job or request was cancelled."""

    code = "CANCELLED"


class Unavailable(AudiomeshError):
    """A dependency (worker, store) cannot be reached right now; retryable."""

    code = "UNAVAILABLE"


class ModelUnavailable(FailedPrecondition):
    """A separation model exists by name but its weights cannot be loaded here."""


class ConfigError(AudiomeshError):
    """A setting is invalid; the message names the environment variable."""

    code = "FAILED_PRECONDITION"
