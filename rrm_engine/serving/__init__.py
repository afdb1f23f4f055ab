"""Serving: the async engine (one background step loop shared by every caller) and, above it,
the HTTP server and training-loop adapters."""
from .async_llm import AsyncLLM
from .errors import EngineDeadError, RequestFailedError, RequestTimeoutError
from .stream import RequestStream

__all__ = ["AsyncLLM", "EngineDeadError", "RequestFailedError", "RequestTimeoutError", "RequestStream"]
