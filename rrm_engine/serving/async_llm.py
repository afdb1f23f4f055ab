"""INTERIM AsyncLLM of the serving-api branch, written to the interface agreed with serving-core so
that the judge, the server and the adapters could be built before serving-core's AsyncLLM landed.
serving-core's implementation replaces this file at merge; nothing here is meant to outlive it.

One background thread owns the engine's step loop (through the LLM's caller-driven API:
add_request / step / abort / has_unfinished); any thread submits and gets a concurrent Future, any
event loop awaits `generate` or iterates `stream`. Commands from callers are queued and applied by
the loop thread between steps, so the engine is only ever touched by that thread.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams


@dataclass
class _Live:
    future: Future
    on_output: Callable[[Any], None] | None
    deadline: float | None


class AsyncLLM:
    def __init__(self, llm: Any):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self._cond = threading.Condition()
        self._cmds: list[tuple] = []
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rrm-async-llm", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model: str = "embedded", **llm_kwargs: Any) -> "AsyncLLM":
        from ..llm import LLM

        return cls.of(LLM(model, **llm_kwargs))

    _of_lock = threading.Lock()

    @classmethod
    def of(cls, llm: Any) -> "AsyncLLM":
        """The one AsyncLLM of `llm` (created on first use)."""
        if isinstance(llm, AsyncLLM):
            return llm
        with cls._of_lock:
            a = getattr(llm, "_rrm_async_llm", None)
            if a is None or a._closed:
                a = cls(llm)
                llm._rrm_async_llm = a
            return a

    # ------------------------------------------------------------------------------- callers
    def _encode(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)):
            return list(prompt)
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    def _submit(self, prompt: Any, params: SamplingParams, request_id: str | None, timeout: float | None,
                on_output: Callable[[Any], None] | None) -> Future:
        ids = self._encode(prompt)
        engine = getattr(self.llm, "engine", None)  # the benchmark's recorder wraps an LLM without one
        if engine is not None:
            engine.validate(ids, params)
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0, got {timeout!r}")
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("AsyncLLM is shut down")
            rid = request_id if request_id is not None else f"async-{next(self._ids)}"
            if rid in self._live or any(c[0] == "add" and c[1] == rid for c in self._cmds):
                raise ValueError(f"request id {rid!r} is already in use")
            fut.request_id = rid  # type: ignore[attr-defined]
            deadline = None if timeout is None else time.monotonic() + timeout
            self._cmds.append(("add", rid, ids, params, _Live(fut, on_output, deadline)))
            self._cond.notify()
        return fut

    def submit(self, prompt: str | list[int], params: SamplingParams, *, request_id: str | None = None,
               timeout: float | None = None) -> Future:
        return self._submit(prompt, params, request_id, timeout, None)

    async def generate(self, prompt: str | list[int], params: SamplingParams, *, request_id: str | None = None,
                       timeout: float | None = None) -> RequestOutput:
        fut = self.submit(prompt, params, request_id=request_id, timeout=timeout)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            self.abort(fut.request_id)  # type: ignore[attr-defined]
            raise

    async def stream(self, prompt: str | list[int], params: SamplingParams, *, request_id: str | None = None,
                     timeout: float | None = None) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        fut = self._submit(prompt, params, request_id, timeout, lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not fut.done():
                self.abort(fut.request_id)  # type: ignore[attr-defined]

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._cmds.append(("abort", request_id))
            self._cond.notify()

    def metrics(self) -> dict:
        m = dict(self.llm.metrics())
        with self._cond:
            m["queue_depth"] = len(self._live) + sum(c[0] == "add" for c in self._cmds)
        m["kv_use"] = m["kv_blocks_used"] / m["kv_blocks_total"] if m.get("kv_blocks_total") else 0.0
        return m

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------------- loop thread
    @staticmethod
    def _fail(live: _Live, err: BaseException) -> None:
        if not live.future.done():
            live.future.set_exception(err)
        if live.on_output is not None:
            live.on_output(err)

    def _apply(self, cmds: list[tuple]) -> None:
        for cmd in cmds:
            if cmd[0] == "add":
                _, rid, ids, params, live = cmd
                try:
                    self.llm.add_request(ids, params, request_id=rid)
                except Exception as e:
                    self._fail(live, e)
                else:
                    self._live[rid] = live
            else:
                live = self._live.pop(cmd[1], None)
                if live is not None:
                    out = self.llm.abort(cmd[1])
                    if out is not None:
                        self._deliver(live, out)
                    else:
                        self._fail(live, RuntimeError(f"request {cmd[1]} was aborted"))

    def _deliver(self, live: _Live, out: RequestOutput) -> None:
        if live.on_output is not None:
            live.on_output(out)
        if out.finished and not live.future.done():
            live.future.set_result(out)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._cmds and not self._live and not self._closed:
                    self._cond.wait(timeout=0.5)
                cmds, self._cmds = self._cmds, []
                closed = self._closed
            if closed:
                for rid, live in list(self._live.items()):
                    self.llm.abort(rid)
                    self._fail(live, RuntimeError("AsyncLLM is shut down"))
                self._live.clear()
                for cmd in cmds:
                    if cmd[0] == "add":
                        self._fail(cmd[4], RuntimeError("AsyncLLM is shut down"))
                return
            self._apply(cmds)
            now = time.monotonic()
            for rid, live in list(self._live.items()):
                if live.deadline is not None and now > live.deadline:
                    del self._live[rid]
                    self.llm.abort(rid)
                    self._fail(live, TimeoutError(f"request {rid} timed out"))
            if not self.llm.has_unfinished():
                continue
            try:
                outs = self.llm.step()
            except Exception as e:  # the step's requests fail with the error; the engine goes on
                for rid, live in list(self._live.items()):
                    self.llm.abort(rid)
                    self._fail(live, e)
                self._live.clear()
                continue
            for out in outs:
                live = self._live.get(out.request_id)
                if live is None:
                    continue
                if out.finished:
                    del self._live[out.request_id]
                self._deliver(live, out)
