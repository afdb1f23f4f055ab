"""What a waiter of the AsyncLLM can get instead of a RequestOutput."""
from __future__ import annotations


class RequestFailedError(RuntimeError):
    """The engine step that ran this request raised, or the engine stopped the request itself
    (its logits were NaN/inf; the message names it). A failed step is rolled back (engine.py,
    "Failed steps"); either way every other request goes on. __cause__ is the step's original
    exception (None for NaN logits); .output the request's final output (finished, .error set,
    finish_reason "error" on the samples that had not finished)."""

    def __init__(self, request_id: str, message: str, output=None):
        super().__init__(message)
        self.request_id = request_id
        self.output = output

    def __reduce__(self):
        return RequestFailedError, (self.request_id, str(self), self.output)


class RequestTimeoutError(TimeoutError):
    """The request ran past its timeout and was aborted in the engine. .output is its output at
    that moment (finished, finish_reason "abort" on the samples that had not finished), or None
    if it never reached the engine."""

    def __init__(self, request_id: str, timeout: float, output=None):
        super().__init__(f"request {request_id!r} timed out after {timeout:g} s (aborted in the engine)")
        self.request_id = request_id
        self.timeout = timeout
        self.output = output

    def __reduce__(self):
        return RequestTimeoutError, (self.request_id, self.timeout, self.output)


class EngineDeadError(RuntimeError):
    """The AsyncLLM's loop has ended: it was shut down, or it died on an error the engine could
    not roll back (then __cause__ is that error). Every request in flight gets this, and so does
    every later submit."""
