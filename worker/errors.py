"""Errors raised to callers, and the error codes stored in failed results."""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "prompt_too_long", "invalid_request", "out_of_memory", "worker_lost", "internal"
]


EX_MODEL_UNAVAILABLE = 3  # a worker's exit code when its model cannot load here (unreachable,
# gated, no such folder): restarting it will not help, so `genq up` does not


class GenqError(Exception):
    """Base class of genqueue's errors; ``code`` is the result schema's error code."""

    code: ErrorCode = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def as_error(self) -> dict[str, str]:
        """The ``error`` field of a failed result."""
        return {"code": self.code, "message": self.message}


class InvalidRequest(GenqError, ValueError):
    """The request is malformed; nothing was queued."""

    code: ErrorCode = "invalid_request"


class PromptTooLong(InvalidRequest):
    """The prompt plus ``max_new_tokens`` does not fit the model's context."""

    code: ErrorCode = "prompt_too_long"


class QueueFull(GenqError):
    """More than ``GENQ_MAX_PENDING`` requests are waiting; nothing was queued."""

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobReaped(GenqError):
    """A job's submitter showed no life for ``GENQ_JOB_SUBMIT_TIMEOUT_S`` while queueing: the
    job was failed and what it had queued cancelled."""

    def __init__(self, message: str, job_id: str):
        super().__init__(message)
        self.job_id = job_id


class NotFound(GenqError, KeyError):
    """No request or job with that id (never existed, or expired)."""

    name = "not_found"  # the OpenAI error object's ``code``


class ModelNotFound(NotFound):
    """No model or adapter with that name."""

    name = "model_not_found"


class OutOfMemory(GenqError):
    """A single row still ran out of memory after its batch was split down to it."""

    code: ErrorCode = "out_of_memory"


class IdempotencyConflict(GenqError):
    """The idempotency key was used before with a different request body."""

    code: ErrorCode = "invalid_request"


class GenerationFailed(Exception):
    """A request that ended ``failed``, as Celery raises it from ``AsyncResult(id).get()``.

    Its one argument is ``"<code>: <message>"`` (the result's ``error``). Celery rebuilds it
    from the stored meta (``exc_module`` ``worker.errors``, ``exc_type`` ``GenerationFailed``):
    as this class where ``worker.errors`` is imported, else as an exception class of that name
    that Celery makes on the spot; ``str(exc)`` and ``exc.args[0]`` read the same either way."""

    @property
    def code(self) -> str:
        return str(self.args[0]).partition(": ")[0] if self.args else "internal"

    @property
    def message(self) -> str:
        return str(self.args[0]).partition(": ")[2] if self.args else ""
