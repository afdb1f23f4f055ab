"""The async iterator that AsyncLLM.stream() returns: incremental outputs of one request.

The engine loop thread hands over cumulative snapshots (RequestOutput with everything so far);
the consumer takes the latest one when it asks for the next item, so a slow consumer gets fewer
items and nothing piles up. Every item holds all n samples; a sample's finish_reason is set from
the item where it finishes on; the last item has finished=True. Two kinds of items:
  * delta=True (default): each item holds, per sample, only what is new since the previous item:
    token_ids, text, logprobs, sampling_logprobs (cumulative_logprob is the running total).
    Joining a sample's items gives its final token_ids and text.
  * delta=False: each item is the output so far (like vLLM's CUMULATIVE kind); the last one equals
    what generate() returns.
Either way streamed text never runs ahead of the final text: with stop strings, the last (longest
stop string - 1) characters of an unfinished sample are held back, since a stop string completed
later cuts them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import weakref
from concurrent.futures import Future
from typing import Callable

from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams


class RequestStream:
    """AsyncIterator[RequestOutput] of one request, consumed from one event loop. Raises what the
    request's future raises (RequestTimeoutError, RequestFailedError, EngineDeadError). Leaving it
    before the end (break, aclose(), a cancelled task, dropping it) aborts the request."""

    def __init__(self, request_id: str, future: Future, params: SamplingParams, abort: Callable[[], None],
                 delta: bool = True):
        self.request_id = request_id
        self._future = future
        self._abort = abort
        self._lock = threading.Lock()
        self._latest: RequestOutput | None = None  # newest snapshot not yet turned into an item
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._done = False  # the last item was given (or the request's error raised)
        self._items = _Items(params, delta)
        me = weakref.ref(self)  # the future must not keep a dropped stream alive
        future.add_done_callback(lambda _: (s := me()) is not None and s._wake())

    # ------------------------------------------------------------------ engine loop thread
    def _push(self, snapshot: RequestOutput) -> None:
        with self._lock:
            self._latest = snapshot
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            loop, event = self._loop, self._event
        if loop is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop is closed; dropping the stream aborts the request
                pass

    # --------------------------------------------------------------------------- consumer
    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        if self._event is None:
            with self._lock:
                self._loop, self._event = loop, asyncio.Event()
        elif loop is not self._loop:
            raise RuntimeError("a stream is consumed from the event loop that first iterated it")
        try:
            while True:
                self._event.clear()
                if self._future.done():
                    self._done = True
                    return self._items.take(self._future.result())  # raises the request's error
                with self._lock:
                    snapshot, self._latest = self._latest, None
                if snapshot is not None:
                    return self._items.take(snapshot)
                await self._event.wait()
        except asyncio.CancelledError:
            self.close()
            raise

    def close(self) -> None:
        """Stop consuming: aborts the request if it has not finished (thread-safe, idempotent)."""
        if not self._done:
            self._done = True
            if not self._future.done():
                self._abort()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._done and not self._future.done():
            self._abort()  # lock-free: safe wherever the garbage collector runs this


class _Items:
    """Snapshots to items; for deltas, per sample how many tokens and characters were handed out."""

    def __init__(self, params: SamplingParams, delta: bool):
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.delta = delta
        self.sent: dict[int, tuple[int, int]] = {}

    def take(self, out: RequestOutput) -> RequestOutput:
        if not self.delta and not (self.hold and not out.finished):
            return out  # the engine builds a fresh output every step: nothing to copy
        items = []
        for c in out.outputs:
            ntok, nchar = self.sent.get(c.index, (0, 0))
            end = len(c.text)
            if c.finish_reason is None and self.hold:
                end = max(nchar, end - self.hold)
            if not self.delta:
                items.append(dataclasses.replace(c, text=c.text[:end]))
                self.sent[c.index] = (0, end)
                continue
            items.append(CompletionOutput(
                c.index, c.text[nchar:end], c.token_ids[ntok:], c.finish_reason, c.cumulative_logprob,
                c.logprobs[ntok:] if c.logprobs is not None else None, c.stop_reason, c.sampling_logprobs[ntok:]))
            self.sent[c.index] = (len(c.token_ids), end)
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, items, out.finished,
                             out.num_cached_tokens, out.error)
