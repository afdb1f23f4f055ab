"""The AsyncLLM's interface (generate / stream / abort) over an LLM that an AsyncLLM cannot drive: one
rank of a tensor-parallel process group (ranks launched by torchrun or tensor_parallel_launch, or
the actors of a Ray replica), where every rank runs the same judge calls and the ranks must run
identical steps. (An LLM(path, tensor_parallel_size=N) built in one process starts its own ranks
and is driven by an AsyncLLM, which sends every call to all of them.)

It lives on one event loop, the judge's background loop, and steps the LLM there through its
caller-driven API (add_request / step / abort): a request is added the moment a coroutine submits
it, one stepping task runs llm.step() while any request is unfinished and yields to the loop after
each step so that the coroutines read their results and submit what follows. No thread and no clock
decides the order, so the same judge calls add the same requests in the same order on every rank.
(A `timeout` is the exception: it is wall-clock, so ranks may disagree about it.)

Streams yield, as the AsyncLLM's do, what is new for each sample; they get an item whenever one of
the request's samples finishes (the engine reports no partial output here).
"""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..outputs import CompletionOutput, RequestOutput


@dataclass
class _Waiter:
    future: asyncio.Future
    queue: asyncio.Queue | None = None  # a stream's items
    sent: dict[int, tuple[int, int]] = field(default_factory=dict)  # sample -> (tokens, chars) handed out


class LockstepEngine:
    def __init__(self, llm: Any, loop: asyncio.AbstractEventLoop):
        self.llm, self.tokenizer, self.loop = llm, llm.tokenizer, loop
        self._waiters: dict[str, _Waiter] = {}
        self._stepping: asyncio.Task | None = None
        self._ids = itertools.count()

    def _add(self, prompt: Any, params: Any, request_id: str | None, stream: bool) -> tuple[str, _Waiter]:
        if asyncio.get_running_loop() is not self.loop:
            raise RuntimeError("a tensor-parallel judge runs on the judge's background loop only")
        rid = self.llm.add_request(prompt, params, request_id=request_id or f"lockstep-{next(self._ids)}")
        w = _Waiter(self.loop.create_future(), asyncio.Queue() if stream else None)
        self._waiters[rid] = w
        if self._stepping is None:
            self._stepping = self.loop.create_task(self._run())
        return rid, w

    async def generate(self, prompt: Any, params: Any, *, request_id: str | None = None,
                       timeout: float | None = None) -> RequestOutput:
        rid, w = self._add(prompt, params, request_id, stream=False)
        try:
            return await (w.future if timeout is None else asyncio.wait_for(w.future, timeout))
        except BaseException:
            self.abort(rid)
            raise

    async def stream(self, prompt: Any, params: Any, *, request_id: str | None = None,
                     timeout: float | None = None) -> AsyncIterator[RequestOutput]:
        rid, w = self._add(prompt, params, request_id, stream=True)
        try:
            while True:
                out = await w.queue.get()
                if isinstance(out, BaseException):
                    raise out
                yield _delta(out, w.sent)
                if out.finished:
                    return
        finally:
            self.abort(rid)

    def abort(self, request_id: str) -> None:
        w = self._waiters.pop(request_id, None)
        if w is not None:
            self._deliver(w, self.llm.abort(request_id), finished=True)

    @staticmethod
    def _deliver(w: _Waiter, out: Any, finished: bool) -> None:
        if w.queue is not None and out is not None:
            w.queue.put_nowait(out)
        if finished and not w.future.done():
            if isinstance(out, BaseException):
                w.future.set_exception(out)
            else:
                w.future.set_result(out)

    async def _run(self) -> None:
        try:
            while self._waiters:
                try:
                    outs = self.llm.step()
                except Exception as e:  # a failed step (rolled back by the engine): its requests fail
                    failed = {o.request_id for o in getattr(e, "outputs", [])} or set(self._waiters)
                    for rid in failed:
                        w = self._waiters.pop(rid, None)
                        if w is not None:
                            self.llm.abort(rid)
                            self._deliver(w, RuntimeError(f"engine step failed: {type(e).__name__}: {e}"), True)
                    outs = []
                for out in outs:
                    w = self._waiters.get(out.request_id)
                    if w is None:
                        continue
                    if out.finished:
                        del self._waiters[out.request_id]
                    self._deliver(w, out, out.finished)
                await asyncio.sleep(0)  # the coroutines read their results and submit what follows
        finally:
            self._stepping = None


def _delta(out: RequestOutput, sent: dict[int, tuple[int, int]]) -> RequestOutput:
    items = []
    for c in out.outputs:
        ntok, nchar = sent.get(c.index, (0, 0))
        items.append(CompletionOutput(c.index, c.text[nchar:], list(c.token_ids[ntok:]), c.finish_reason,
                                      c.cumulative_logprob, None if c.logprobs is None else c.logprobs[ntok:],
                                      c.stop_reason))
        sent[c.index] = (len(c.token_ids), len(c.text))
    return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, items, out.finished,
                         out.num_cached_tokens)
