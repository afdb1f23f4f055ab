"""Serving: the engine's async front (AsyncLLM), the HTTP server of `python -m rrm_engine serve`, its
client, and the training-loop entry points that need them (verl.py).

Sits above the engine and the judge. Names are imported on first use, so importing this package does
not need the `serve` extra (fastapi, uvicorn, httpx).
"""
from __future__ import annotations

from typing import Any

_LAZY = {"AsyncLLM": "async_llm", "JudgeClient": "client", "build_app": "server", "run_server": "server"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
