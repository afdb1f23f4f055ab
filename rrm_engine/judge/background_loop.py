"""One event loop in a daemon thread, where the judge's synchronous API runs its coroutines.

Judge.compare / rank / ..._batch are coroutines underneath (they await the shared AsyncLLM). A
synchronous caller (a script, a thread of verl's pool, a TRL reward function) hands its coroutine to
this loop and blocks on the result; every such caller shares the loop, so their requests meet in the
engine's batches. Async callers never come here: they await the coroutines on their own loop.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="rrm-judge-loop", daemon=True)
            thread.start()
            _loop, _thread = loop, thread
        return _loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the background loop and wait. If the waiting thread is interrupted, the coroutine
    is cancelled (which aborts its engine requests)."""
    loop = background_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError("a synchronous judge call from inside the judge's own event loop would deadlock; "
                           "await the async variant (acompare, arank, ...) instead")
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return fut.result()
    except BaseException:
        fut.cancel()
        raise
