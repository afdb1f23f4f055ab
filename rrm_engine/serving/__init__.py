"""Serving: the HTTP server of `python -m rrm_engine serve`, its client, and the training-loop
entry points that need them (verl.py), all above the engine's async front (rrm_engine/async_engine,
re-exported here) and the judge.

The server and client are imported on first use (JudgeClient, build_app, run_server), so importing
this package does not need the `serve` extra (fastapi, uvicorn, httpx).
"""
from __future__ import annotations

from typing import Any

from ..async_engine import AsyncLLM, EngineDeadError, RequestFailedError, RequestTimeoutError, RequestStream

_LAZY = {"JudgeClient": "client", "build_app": "server", "run_server": "server"}

__all__ = ["AsyncLLM", "EngineDeadError", "RequestFailedError", "RequestTimeoutError", "RequestStream", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
