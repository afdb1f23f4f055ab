"""AsyncLLM: one engine, one background thread that runs its step loop; any number of threads
and event loops submit requests and wait on futures, coroutines or async iterators.

    callers --submit()--> inbox (a lock held for O(1)) --> loop thread: add, step, hand out results

The loop thread is the only one that changes the engine; it holds `engine_lock` while it does, so
the few LLM methods that must change the engine from another thread (reset_metrics,
invalidate_prefix_cache) wait for the end of the current step. With no work it sleeps on a
condition (no busy wait). It adds no host sync and no per-token Python work: results come from
the step's outputs, which the engine produces per finished request (and, only for requests that
asked to stream, per step).

Semantics (the contract the serving layer codes against)
  * submit / generate / stream validate in the caller's thread: a bad prompt or SamplingParams
    raises ValueError/TypeError there, before anything is queued. Request ids are unique among
    the requests in flight (a duplicate raises ValueError); by default "async-<n>".
  * abort(request_id), from any thread or loop: the waiter gets the request's final RequestOutput
    with finish_reason "abort" on every sample that had not finished. An unknown or already
    finished id is ignored; aborting twice is the same as once.
  * timeout (seconds, counted from submission): at the deadline the request is aborted in the
    engine and the waiter gets RequestTimeoutError (a TimeoutError; .output is the partial
    output). Deadlines are checked between steps, so a request can overrun by one step.
  * stream() items hold only what is new since the previous item (joined, they give the final
    output); stream(..., delta=False) gives each item as the output so far, the last equal to what
    generate() returns. Streamed text never runs ahead of the final text (async_engine/stream.py).
  * Cancelling the Future (or the asyncio task awaiting generate()), or leaving a stream before
    its end (break, aclose(), cancel, dropping it), aborts the request.
  * A step that raises fails only the requests of that step (the engine rolls it back): their
    waiters get RequestFailedError (__cause__: the original error); all others go on. If the
    loop itself dies (an error the engine could not roll back or blame on a request), every
    waiter, present and future, gets EngineDeadError: nothing waits forever, nothing is lost.
  * shutdown(): the loop stops after its current step; requests in flight are aborted in the
    engine and their waiters get EngineDeadError; the LLM is detached and works on its own again.
  * Seeded requests give the same tokens alone or in any concurrent mix: a sample's draws depend
    only on (seed, sample index, token index) (sampler.py); batch composition does not enter.
    Unseeded requests take their seeds from the engine's generator in admission order.
  * Futures are resolved on the loop thread: done-callbacks run there, so keep them short
    (asyncio.wrap_future, used by generate(), only schedules a call on the waiting loop).

The LLM stays usable while attached (LLM.attach_driver: the only thing the two know of each other
is that public protocol): llm.generate() goes through this loop (submit + wait), llm.abort() is
forwarded here, llm.add_request()/step() raise (the loop owns stepping). Each request is
validated once, at the front door its caller entered (submit here, or LLM.generate).
AsyncLLM.of(llm) gives the one AsyncLLM of an LLM (creating it once): share it between every
judge, adapter and server route over that engine.

Tensor parallelism: over LLM(path, tensor_parallel_size=N) built in one process, the engine is a
WorkerEngine (distributed/tp_workers.py) and this loop thread is the only one that adds, steps and
aborts, so every rank gets the same calls in the same order and the ranks stay in lockstep by
construction; every judge, adapter and server route over that LLM gets tensor parallelism through
this one loop. The loop asks of the engine only what both offer: validate (answered locally by a
WorkerEngine), add_request, step, abort, has_unfinished (the ranks' last reported state), metrics,
reset_metrics and the scheduler's queue lengths. One rank of a process group (torchrun, a Ray
replica, where every rank runs its own callers) is refused: one loop per rank, fed by callers
whose timing differs between ranks, cannot keep the ranks' steps identical (the judge steps such
ranks with async_engine/lockstep.py instead).
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import heapq
import itertools
import math
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import AsyncIterator

from ..core.engine import Engine, StepError
from ..distributed.tp_workers import WorkerEngine
from ..llm import LLM
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams
from .errors import EngineDeadError, RequestFailedError, RequestTimeoutError
from .stream import RequestStream

_live_instances: "weakref.WeakSet[AsyncLLM]" = weakref.WeakSet()


@dataclass(eq=False)
class _Pending:
    """One submitted request, as the loop sees it."""
    request_id: str
    prompt_ids: list[int]
    prompt: str | None
    params: SamplingParams
    future: Future
    timeout: float | None
    deadline: float | None
    stream: "weakref.ref[RequestStream] | None" = None  # weak: dropping the stream aborts the request
    in_engine: bool = False
    abort_requested: bool = False  # aborted before it reached the engine
    resolved: bool = False  # its final result is decided (delivered at the end of the iteration)
    hold: RequestStream | None = None  # the stream, until stream() hands it to the caller


class AsyncLLM:
    def __init__(self, llm: LLM):
        if not isinstance(llm, LLM):
            raise TypeError(f"AsyncLLM wraps an rrm_engine.LLM, got {type(llm).__name__}")
        if not isinstance(llm.engine, (Engine, WorkerEngine)):
            raise ValueError(f"AsyncLLM drives an Engine or the WorkerEngine of spawned tensor-parallel ranks, "
                             f"not a {type(llm.engine).__name__}")
        if isinstance(llm.engine, Engine) and getattr(llm.engine.model, "gather_logits", None) is not None:
            raise ValueError("AsyncLLM cannot drive one rank of a tensor-parallel process group (torchrun, "
                             "tensor_parallel_launch, a Ray replica): the ranks must run identical steps, and one loop "
                             "per rank fed by its own callers cannot guarantee that. Build LLM(path, "
                             "tensor_parallel_size=N) in one process instead (it starts the ranks and one AsyncLLM "
                             "drives them all); a Judge on every rank steps them in lockstep itself")
        self._llm = llm
        self._engine = llm.engine
        self.engine_lock = threading.Lock()  # held by the loop around everything it does to the engine
        self._cv = threading.Condition(threading.Lock())  # guards inbox, live, closing
        self._inbox: list[_Pending] = []
        self._aborts: deque[tuple[str, _Pending | None]] = deque()  # appended lock-free (from __del__ too)
        self._live: dict[str, _Pending] = {}  # submitted, not yet resolved
        self._deadlines: list[tuple[float, int, _Pending]] = []
        self._ids = itertools.count()
        self._tie = itertools.count()
        self._closing = False
        self._dead: EngineDeadError | None = None
        self._stats = dict.fromkeys(("requests_submitted", "requests_finished", "requests_aborted",
                                     "requests_timed_out", "requests_failed"), 0)
        self._thread = threading.Thread(target=self._run, name="rrm-async-llm", daemon=True)
        llm.attach_driver(self)  # waits for a caller-driven call in progress; refuses a second driver
        _live_instances.add(self)
        self._thread.start()

    @classmethod
    def of(cls, llm: LLM) -> "AsyncLLM":
        """The AsyncLLM that drives llm's engine, created on first use (thread-safe). A dead one
        (its loop crashed) is returned as it is: its calls raise EngineDeadError naming the cause."""
        return llm.driver_or_attach(lambda: cls(llm))

    @classmethod
    def from_pretrained(cls, model="embedded", **llm_kwargs) -> "AsyncLLM":
        return cls(LLM(model, **llm_kwargs))

    @property
    def problem(self) -> str | None:
        """Why this AsyncLLM cannot serve (its loop died, was shut down, or its thread ended), or None
        while it can. For health checks: submitting would raise EngineDeadError with this text."""
        if self._dead is not None:
            return str(self._dead)
        if self._closing:
            return "the engine is shutting down"
        if not self._thread.is_alive() and self._thread.ident is not None:
            return "the engine's loop thread has ended"
        return None

    @property
    def llm(self) -> LLM:
        return self._llm

    @property
    def tokenizer(self):
        return self._llm.tokenizer

    # ---------------------------------------------------------------------------- submit
    def submit(self, prompt: str | list[int], params: SamplingParams, *, request_id: str | None = None,
               timeout: float | None = None) -> Future:
        """Queue one request; returns a concurrent.futures.Future[RequestOutput] (its final
        output). Thread-safe. Cancelling the future aborts the request."""
        return self._submit(prompt, params, request_id, timeout, stream=False).future

    async def generate(self, prompt: str | list[int], params: SamplingParams, *, request_id: str | None = None,
                       timeout: float | None = None) -> RequestOutput:
        """The request's final output, awaited from any event loop; cancelling the awaiting task
        aborts the request."""
        fut = self.submit(prompt, params, request_id=request_id, timeout=timeout)
        return await asyncio.wrap_future(fut)

    def stream(self, prompt: str | list[int], params: SamplingParams, *, request_id: str | None = None,
               timeout: float | None = None, delta: bool = True) -> AsyncIterator[RequestOutput]:
        """Outputs as tokens come, the last one finished=True: what is new in each item, or with
        delta=False each item the output so far (see async_engine/stream.py). The request is queued
        now (validation errors raise here); consume it from one event loop."""
        p = self._submit(prompt, params, request_id, timeout, stream=True, delta=delta)
        s, p.hold = p.hold, None  # from here on only the caller keeps the stream alive
        return s

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread or loop; its waiter gets its output (finish_reason "abort")."""
        with self._cv:
            if self._dead is None:  # a dead loop has already answered every waiter
                self._aborts.append((request_id, None))
                self._cv.notify()

    def generate_encoded(self, encoded: list[tuple[list[int], str | None]],
                         params: list[SamplingParams]) -> list[RequestOutput]:
        """LLM.generate() while attached: submit every prompt, wait for all; on any error (or
        Ctrl-C) abort the ones still running, so none stays queued."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LLM.generate() on the AsyncLLM's own loop thread (inside a done-callback?) "
                               "would wait for itself")
        pending: list[_Pending] = []
        try:
            for (ids, text), sp in zip(encoded, params):
                pending.append(self._enqueue(ids, text, sp, None, None, stream=False))
            return [p.future.result() for p in pending]
        except BaseException:
            for p in pending:
                if not p.future.done():
                    self._aborts.append((p.request_id, p))
            with self._cv:
                self._cv.notify()
            raise

    def _submit(self, prompt, params, request_id, timeout, stream: bool, delta: bool = True) -> _Pending:
        self._check_open()
        ids, text = self._llm.encode(prompt)
        self._engine.validate(ids, params)  # the one validation; reads only the engine's fixed limits
        return self._enqueue(ids, text, params, request_id, timeout, stream, delta)

    def _enqueue(self, ids, text, params, request_id, timeout, stream: bool, delta: bool = True) -> _Pending:
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0 or math.isinf(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise ValueError(f"request_id must be a non-empty str or None, got {request_id!r}")
        fut: Future = Future()
        with self._cv:
            self._check_open()
            if request_id is None:
                request_id = f"async-{next(self._ids)}"
                while request_id in self._live:
                    request_id = f"async-{next(self._ids)}"
            elif request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in flight")
            p = _Pending(request_id, ids, text, params, fut, timeout,
                         None if timeout is None else time.monotonic() + timeout)
            if stream:
                p.hold = RequestStream(request_id, fut, params, abort=lambda: self._aborts.append((p.request_id, p)),
                                       delta=delta)
                p.stream = weakref.ref(p.hold)
            self._live[request_id] = p
            self._inbox.append(p)
            self._stats["requests_submitted"] += 1
            self._cv.notify()
        fut.add_done_callback(lambda f: f.cancelled() and self._aborts.append((p.request_id, p)))
        return p

    def _check_open(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(str(self._dead)) from self._dead.__cause__
        if self._closing:
            raise EngineDeadError("the AsyncLLM is shutting down")

    # ------------------------------------------------------------------------- the loop
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._inbox or self._aborts or self._closing or self._engine.has_unfinished()):
                        self._cv.wait()
                    if self._closing:
                        break
                    new, self._inbox = self._inbox, []
                results: list[tuple[_Pending, RequestOutput | BaseException]] = []
                snapshots: list[tuple[_Pending, RequestOutput]] = []
                with self.engine_lock:
                    for p in new:
                        self._admit(p, results)
                    self._apply_aborts(results)
                    self._expire(results)
                    if self._engine.has_unfinished():
                        self._step(results, snapshots)
                self._deliver(results, snapshots)
        except BaseException as e:  # the engine could not go on: nobody may wait forever
            dead = EngineDeadError(f"the AsyncLLM loop died: {type(e).__name__}: {e}")
            dead.__cause__ = e
            self._end(dead, detach=False)
            return
        self._end(EngineDeadError("the AsyncLLM was shut down"), detach=True)

    def _admit(self, p: _Pending, results: list) -> None:
        if p.abort_requested or p.future.cancelled():
            p.resolved = True
            results.append((p, _unstarted(p)))
            return
        try:
            self._engine.add_request(p.prompt_ids, p.params, request_id=p.request_id, prompt=p.prompt,
                                     stream=p.stream is not None, validated=True)
        except Exception as e:  # validated at submit; anything here is the engine's to explain
            p.resolved = True
            results.append((p, e))
            return
        p.in_engine = True
        if p.deadline is not None:
            heapq.heappush(self._deadlines, (p.deadline, next(self._tie), p))

    def _apply_aborts(self, results: list) -> None:
        while self._aborts:
            rid, who = self._aborts.popleft()
            with self._cv:
                p = self._live.get(rid)
            if p is None or p.resolved or (who is not None and who is not p):
                continue
            if not p.in_engine:  # submitted after this iteration took the inbox: resolved on admission
                p.abort_requested = True
                continue
            out = self._engine.abort(rid)
            if out is not None:
                p.resolved = True
                results.append((p, out))

    def _expire(self, results: list) -> None:
        now = time.monotonic()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, p = heapq.heappop(heap)
            if p.resolved:
                continue
            p.resolved = True
            results.append((p, RequestTimeoutError(p.request_id, p.timeout, self._engine.abort(p.request_id))))
        if len(heap) > 64 and len(heap) > 2 * len(self._live):  # entries of requests long finished
            self._deadlines = [e for e in heap if not e[2].resolved]
            heapq.heapify(self._deadlines)

    def _step(self, results: list, snapshots: list) -> None:
        try:
            outs = self._engine.step()
        except StepError as e:  # rolled back: only these requests fail
            for out in e.outputs:
                p = self._live.get(out.request_id)
                if p is not None and not p.resolved:
                    err = RequestFailedError(out.request_id, f"the engine step running request {out.request_id!r} "
                                             f"failed: {type(e.error).__name__}: {e.error}", out)
                    err.__cause__ = e.error
                    p.resolved = True
                    results.append((p, err))
            return
        for out in outs:
            p = self._live.get(out.request_id)
            if p is None or p.resolved:
                continue
            if out.finished:
                p.resolved = True
                # a request the engine stopped on its own (NaN/inf logits) fails like one of a failed step
                results.append((p, RequestFailedError(out.request_id, out.error, out) if out.error else out))
            elif p.stream is not None:
                snapshots.append((p, out))

    def _deliver(self, results: list, snapshots: list) -> None:
        with self._cv:
            for p, outcome in results:
                if self._live.get(p.request_id) is p:
                    del self._live[p.request_id]
                self._stats[_outcome_key(outcome)] += 1
        for p, outcome in results:
            if isinstance(outcome, BaseException):
                _settle(p.future, exception=outcome)
            else:
                _settle(p.future, result=outcome)
        for p, snap in snapshots:
            s = p.stream()
            if s is None:  # the consumer dropped the stream
                self._aborts.append((p.request_id, p))
            else:
                s._push(snap)

    def _end(self, error: EngineDeadError, detach: bool) -> None:
        with self._cv:
            self._closing = True
            self._dead = error
            pending = list(self._live.values())
            self._live.clear()
            self._inbox.clear()
            self._aborts.clear()
        with contextlib.suppress(Exception), self.engine_lock:  # leave the engine empty if it still works
            # the engine holds exactly these: the LLM adds nothing while attached, and a resolved
            # request has left the engine (finished, aborted, or failed and rolled back)
            for p in pending:
                if p.in_engine:
                    self._engine.abort(p.request_id)
        for p in pending:
            err = EngineDeadError(f"request {p.request_id!r} did not finish: {error}")
            err.__cause__ = error.__cause__
            _settle(p.future, exception=err)
        if detach:
            self._llm.detach_driver(self)
        _live_instances.discard(self)

    # -------------------------------------------------------------------------- control
    def has_unfinished(self) -> bool:
        with self._cv:
            return bool(self._live)

    def metrics(self) -> dict:
        """Engine metrics (cumulative counters, kv_blocks_used / kv_blocks_total / kv_blocks_peak)
        plus: waiting / running (sequences in the scheduler's queues), requests_in_flight
        (submitted, not yet answered), requests_queued (submitted, not yet in the engine), and
        requests_submitted / _finished / _aborted / _timed_out / _failed since start."""
        m = self._engine.metrics()
        m["waiting"], m["running"] = _queue_lengths(self._engine)
        with self._cv:
            m["requests_in_flight"] = len(self._live)
            m["requests_queued"] = len(self._inbox)
            m.update(self._stats)
        return m

    def reset_metrics(self) -> None:
        """Restart the engine's cumulative counters (waits for the current step; the
        requests_* counters of this AsyncLLM keep counting since its start)."""
        with self.engine_lock:
            self._engine.reset_metrics()

    def shutdown(self) -> None:
        """Stop the loop after its current step; requests in flight get EngineDeadError. Idempotent."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _queue_lengths(engine: Engine | WorkerEngine) -> tuple[int, int]:
    """(waiting, running) sequences in the scheduler: read in place, or as the ranks last reported."""
    if isinstance(engine, WorkerEngine):
        return engine.queue_lengths()
    return len(engine.scheduler.waiting), len(engine.scheduler.running)


def _outcome_key(outcome: RequestOutput | BaseException) -> str:
    if isinstance(outcome, RequestTimeoutError):
        return "requests_timed_out"
    if isinstance(outcome, BaseException):
        return "requests_failed"
    return "requests_aborted" if any(c.finish_reason == "abort" for c in outcome.outputs) else "requests_finished"


def _unstarted(p: _Pending) -> RequestOutput:
    """The output of a request aborted before it reached the engine."""
    outs = [CompletionOutput(i, "", [], "abort", 0.0) for i in range(p.params.n)]
    return RequestOutput(p.request_id, p.prompt, p.prompt_ids, outs, finished=True)


def _settle(fut: Future, result=None, exception: BaseException | None = None) -> None:
    """Resolve a future unless its waiter cancelled it meanwhile."""
    try:
        if exception is not None:
            fut.set_exception(exception)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


@atexit.register
def _shutdown_all() -> None:
    for a in list(_live_instances):
        with contextlib.suppress(Exception):
            a.shutdown()
