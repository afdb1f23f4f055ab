"""Concurrency soak of one AsyncLLM (tiny random Qwen2, small KV pool so that eviction and
preemption happen): 8 threads x 50 calls (futures, routed LLM.generate, random timeouts, aborts
from a second thread, cancelled futures) and 4 event loops in their own threads x 50 calls
(coroutines, streams, timeouts, cancelled tasks, dropped streams, aborts from an executor), all
seeded. Every call ends in exactly one expected outcome; every completed result equals the
sequential result of the same request; every aborted or timed-out output is a prefix of it; no
unexpected exception; at the end the engine is idle, its books balance and only the prefix cache
holds blocks."""
from __future__ import annotations

import asyncio
import queue
import random
import threading
import time

import pytest

from rrm_engine import LLM, AsyncLLM, SamplingParams
from fault_injection import Chaos, InjectedFault
from rrm_engine.serving import RequestFailedError, RequestTimeoutError
from tiny_engine_model import rand_ids, small_model

THREADS, LOOPS, CALLS = 8, 4, 50


@pytest.fixture(scope="module")
def model():
    return small_model()


def make_llm(model) -> LLM:
    # 64 blocks of 4 tokens for up to 24 running sequences: the pool runs dry, the tree evicts, the
    # newest sequences are preempted and recomputed
    return LLM(model, kv_cache_tokens=64 * 4, block_size=4, max_num_batched_tokens=96, max_num_seqs=24)


def specs() -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(11)
    heads = [rand_ids(rng, rng.randrange(5, 20)) for _ in range(4)]
    out = []
    for i in range(40):
        prompt = rng.choice(heads) + rand_ids(rng, rng.randrange(1, 16))
        params = SamplingParams(n=rng.choice([1, 1, 2, 3]), temperature=rng.choice([0.0, 0.7, 1.0]),
                                top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 20]), seed=500 + i,
                                max_tokens=rng.randrange(2, 14), ignore_eos=True)
        out.append((prompt, params))
    return out


def tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


class Book:
    """Outcomes of every call, and anything unexpected."""

    def __init__(self):
        self.lock = threading.Lock()
        self.outcomes: dict[str, tuple[int, str, object]] = {}  # request id -> (spec, kind, output)
        self.unexpected: list[str] = []
        self.routed: set[str] = set()

    def record(self, rid: str, spec: int, kind: str, out=None) -> None:
        with self.lock:
            assert rid not in self.outcomes, f"{rid} ended twice"
            self.outcomes[rid] = (spec, kind, out)

    def guard(self, rid: str, fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - every exception is a finding here
            with self.lock:
                self.unexpected.append(f"{rid}: {type(e).__name__}: {e}")


def thread_caller(a: AsyncLLM, work, book: Book, aborter: queue.Queue, t: int) -> None:
    rng = random.Random(1000 + t)
    for k in range(CALLS):
        rid, spec, mode = f"T{t}-{k}", rng.randrange(len(work)), rng.random()
        prompt, params = work[spec]

        def call():
            if mode < 0.45:
                book.record(rid, spec, "result", a.submit(prompt, params, request_id=rid).result(120))
            elif mode < 0.55:  # the routed sync API
                [out] = a.llm.generate([prompt], params)
                book.routed.add(rid)  # its engine id is the AsyncLLM's own
                book.record(rid, spec, "result", out)
            elif mode < 0.7:
                fut = a.submit(prompt, params, request_id=rid, timeout=rng.uniform(0.001, 0.05))
                try:
                    book.record(rid, spec, "result", fut.result(120))
                except RequestTimeoutError as e:
                    book.record(rid, spec, "timeout", e.output)
            elif mode < 0.9:  # aborted by this thread and by the aborter thread, maybe both
                fut = a.submit(prompt, params, request_id=rid)
                time.sleep(rng.uniform(0, 0.01))
                aborter.put(rid)
                if rng.random() < 0.5:
                    a.abort(rid)
                book.record(rid, spec, "result", fut.result(120))
            else:
                fut = a.submit(prompt, params, request_id=rid)
                time.sleep(rng.uniform(0, 0.005))
                if fut.cancel():
                    book.record(rid, spec, "cancelled")
                else:
                    book.record(rid, spec, "result", fut.result(120))
        book.guard(rid, call)


def loop_caller(a: AsyncLLM, work, book: Book, li: int) -> None:
    rng = random.Random(2000 + li)
    plan = [(f"L{li}-{k}", rng.randrange(len(work)), rng.random(), rng.uniform(0.001, 0.05)) for k in range(CALLS)]

    async def one(rid: str, spec: int, mode: float, delay: float, gate: asyncio.Semaphore):
        prompt, params = work[spec]
        async with gate:
            if mode < 0.3:
                book.record(rid, spec, "result", await a.generate(prompt, params, request_id=rid))
            elif mode < 0.45:  # stream of deltas: rebuild the output from them
                got = [[] for _ in range(params.n)]
                last = None
                async for last in a.stream(prompt, params, request_id=rid):  # deltas by default
                    for c in last.outputs:
                        got[c.index] += c.token_ids
                assert last.finished
                for c in last.outputs:
                    c.token_ids = got[c.index]
                book.record(rid, spec, "result", last)
            elif mode < 0.55:  # stream of snapshots: each one the output so far
                items = [d async for d in a.stream(prompt, params, request_id=rid, delta=False)]
                assert items[-1].finished and all(
                    f[:len(t)] == t for d in items for t, f in zip(tokens(d), tokens(items[-1])))
                book.record(rid, spec, "result", items[-1])
            elif mode < 0.7:
                try:
                    book.record(rid, spec, "result", await a.generate(prompt, params, request_id=rid, timeout=delay))
                except RequestTimeoutError as e:
                    book.record(rid, spec, "timeout", e.output)
            elif mode < 0.8:
                task = asyncio.ensure_future(a.generate(prompt, params, request_id=rid))
                await asyncio.sleep(delay / 4)
                task.cancel()
                try:
                    book.record(rid, spec, "result", await task)
                except asyncio.CancelledError:
                    book.record(rid, spec, "cancelled")
            elif mode < 0.9:  # a consumer that walks away after the first item
                async for _ in a.stream(prompt, params, request_id=rid):
                    break
                book.record(rid, spec, "dropped")
            else:  # aborted from another thread while this loop awaits it
                fut = asyncio.ensure_future(a.generate(prompt, params, request_id=rid))
                await asyncio.sleep(delay / 4)
                await asyncio.get_running_loop().run_in_executor(None, a.abort, rid)
                book.record(rid, spec, "result", await fut)

    async def main():
        gate = asyncio.Semaphore(8)

        async def guarded(*args):
            try:
                await one(*args, gate)
            except BaseException as e:  # noqa: BLE001
                with book.lock:
                    book.unexpected.append(f"{args[0]}: {type(e).__name__}: {e}")
        await asyncio.gather(*(guarded(*p) for p in plan))
    asyncio.run(main())


@pytest.fixture(scope="module")
def sequential(model):
    """The workload's requests and their results run one at a time on a fresh engine."""
    work = specs()
    seq_llm = make_llm(model)
    return work, [tokens(seq_llm.generate([p], sp)[0]) for p, sp in work]


def test_soak_threads_and_event_loops(model, sequential):
    work, ref = sequential
    book = Book()
    aborter: queue.Queue = queue.Queue()
    a = AsyncLLM(make_llm(model))
    try:
        def abort_worker():
            while (rid := aborter.get()) is not None:
                a.abort(rid)
                a.abort(rid + "-unknown")  # ids nobody submitted are ignored
        helper = threading.Thread(target=abort_worker)
        helper.start()
        workers = [threading.Thread(target=thread_caller, args=(a, work, book, aborter, t)) for t in range(THREADS)]
        workers += [threading.Thread(target=loop_caller, args=(a, work, book, li)) for li in range(LOOPS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(240)
        aborter.put(None)
        helper.join(30)
        assert not any(w.is_alive() for w in workers + [helper]), "a caller hung"

        assert book.unexpected == []
        assert len(book.outcomes) == (THREADS + LOOPS) * CALLS  # nothing lost
        kinds = {k: 0 for k in ("result", "timeout", "cancelled", "dropped")}
        complete = partial = 0
        for rid, (spec, kind, out) in book.outcomes.items():
            kinds[kind] += 1
            if out is None:
                continue
            assert out.finished and out.request_id in (rid, out.request_id if rid in book.routed else None)
            for c in out.outputs:
                want = ref[spec][c.index]
                if c.finish_reason == "abort":
                    assert c.token_ids == want[:len(c.token_ids)], f"{rid} sample {c.index}: not a prefix of the sequential result"
                    partial += 1
                else:
                    assert c.finish_reason == "length" and c.token_ids == want, f"{rid} sample {c.index} differs"
                    complete += 1
        assert all(kinds.values()), kinds  # every kind of ending happened
        assert complete > 400 and partial > 0

        m = a.metrics()
        wait = time.monotonic() + 30
        while a.has_unfinished() and time.monotonic() < wait:
            time.sleep(0.01)
        m = a.metrics()
        assert m["requests_in_flight"] == 0
        assert m["requests_submitted"] == (m["requests_finished"] + m["requests_aborted"] + m["requests_timed_out"])
        assert m["requests_failed"] == 0 and m["failed_steps"] == 0
        assert m["num_preemptions"] > 0 and m["cached_prefix_tokens"] > 0
        eng = a.llm.engine
        with a.engine_lock:
            assert not eng.has_unfinished()
            eng.check()
            assert all(c in (0, 1) for c in eng.pool.ref_counts)
            assert eng.pool.num_used == eng.tree.num_nodes  # only the prefix cache holds blocks
    finally:
        a.shutdown()


def test_soak_with_random_step_faults(model, sequential):
    """Callers in threads and event loops while faults fire at random points of random steps:
    each call gets either the sequential result or RequestFailedError (its output a prefix of
    that result); the loop survives every fault; nothing lost; the engine ends idle and clean."""
    work, ref = sequential
    a = AsyncLLM(make_llm(model))
    eng = a.llm.engine
    # at these rates 84-98 of the 240 calls failed in 4 runs alone: a failed step fails every request
    # in it, so the share depends on how the loop happened to batch them (at twice these rates one CI
    # run had 141 fail, leaving 99 ok)
    per_step = dict.fromkeys(("runner.copy_blocks", "compute_logits", "sample", "tree.evict", "_output"), 0.005)
    chaos = Chaos(eng, p=dict.fromkeys(Chaos.POINTS, 0.001) | per_step, seed=3)  # before any request: loop idle
    lock = threading.Lock()
    outcomes: dict[str, str] = {}
    unexpected: list[str] = []

    def check(rid: str, spec: int, fn) -> None:
        try:
            out = fn()
            assert tokens(out) == ref[spec], f"{rid} differs from the sequential result"
            kind = "ok"
        except RequestFailedError as e:
            assert isinstance(e.__cause__, InjectedFault) and e.output.error
            for c in e.output.outputs:
                assert c.token_ids == ref[spec][c.index][:len(c.token_ids)], f"{rid}: not a prefix"
            kind = "failed"
        with lock:
            outcomes[rid] = kind

    def guarded(rid, spec, fn):
        try:
            check(rid, spec, fn)
        except BaseException as e:  # noqa: BLE001
            with lock:
                unexpected.append(f"{rid}: {type(e).__name__}: {e}")

    def thread_caller(t):
        rng = random.Random(30 + t)
        for k in range(30):
            spec = rng.randrange(len(work))
            guarded(f"T{t}-{k}", spec, lambda: a.submit(*work[spec], request_id=f"T{t}-{k}").result(120))

    def loop_caller(li):
        rng = random.Random(40 + li)
        plan = [(f"L{li}-{k}", rng.randrange(len(work))) for k in range(30)]

        async def streamed(rid, spec):
            got, last = [[] for _ in range(work[spec][1].n)], None
            async for last in a.stream(*work[spec], request_id=rid, delta=True):
                for c in last.outputs:
                    got[c.index] += c.token_ids
            for c in last.outputs:
                c.token_ids = got[c.index]
            return last

        async def main():
            async def one(k, rid, spec):
                coro = streamed(rid, spec) if k % 2 else a.generate(*work[spec], request_id=rid)
                try:
                    out = await coro
                    fn = lambda: out  # noqa: E731
                except RequestFailedError as e:
                    def fn(e=e):
                        raise e
                guarded(rid, spec, fn)
            await asyncio.gather(*(one(k, rid, spec) for k, (rid, spec) in enumerate(plan)))
        asyncio.run(main())

    try:
        workers = [threading.Thread(target=thread_caller, args=(t,)) for t in range(6)]
        workers += [threading.Thread(target=loop_caller, args=(li,)) for li in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(240)
        assert not any(w.is_alive() for w in workers), "a caller hung"
        assert unexpected == []
        assert len(outcomes) == 8 * 30
        kinds = list(outcomes.values())
        assert kinds.count("failed") > 0 and kinds.count("ok") > 60, (kinds.count("ok"), kinds.count("failed"))
        assert a._dead is None, "a fault killed the loop"
        m = a.metrics()
        assert m["failed_steps"] >= 3 and m["requests_failed"] == kinds.count("failed")
        wait = time.monotonic() + 30
        while a.has_unfinished() and time.monotonic() < wait:
            time.sleep(0.01)
        with a.engine_lock:
            chaos.remove()
            assert not eng.has_unfinished()
            eng.check()
            assert eng.pool.num_used == eng.tree.num_nodes
    finally:
        a.shutdown()
        chaos.remove()  # also when an assertion failed: the wrapped engine.sample is module-wide
