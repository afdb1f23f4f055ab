"""Small asyncio helpers shared by the layers above the engine (the judge pool, the server routes)."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Iterable, TypeVar

T = TypeVar("T")


async def all_or_none(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the others (aborting their engine
    requests) before it is raised: a failed prompt of a list does not leave its siblings running to
    max_tokens for nobody."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
