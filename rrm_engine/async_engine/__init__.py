"""The engine's async front: one background thread steps one engine while any number of threads
and event loops submit requests (AsyncLLM), and what a waiter gets instead of an output (errors).

It sits beside llm.py, below the judge and the serving layer: both use it, neither is imported
by it. rrm_engine.serving re-exports these names for callers that found them there first.
"""
from __future__ import annotations

from .async_llm import AsyncLLM
from .errors import EngineDeadError, RequestFailedError, RequestTimeoutError
from .stream import RequestStream

__all__ = ["AsyncLLM", "EngineDeadError", "RequestFailedError", "RequestTimeoutError", "RequestStream"]
