"""AsyncLLM (rrm_engine/async_engine/async_llm.py) on a real engine with a tiny random Qwen2: futures,
coroutines and streams give the sequential results; abort, timeouts, cancellation and dropped
streams stop their request and nothing else; bad input raises before anything is queued; the
sync LLM API keeps working while attached; a failed step fails only its own requests; shutdown
and a dead loop answer every waiter; the idle loop sleeps on its condition."""
from __future__ import annotations

import asyncio
import random
import sys
import threading
import time

import pytest

from fault_injection import Fault, InjectedFault
from rrm_engine import LLM, AsyncLLM, SamplingParams
from rrm_engine.serving import EngineDeadError, RequestFailedError, RequestTimeoutError
from tiny_engine_model import rand_ids, small_model

BS = 4
LONG = SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True)  # seconds of steps: time to abort it


@pytest.fixture(scope="module")
def model():
    m = small_model()
    # at least 1 ms per forward, so that LONG's 600 steps outlast the tests' timeouts and aborts on any
    # backend (the CPU backend's C++ ops step this tiny model in well under a millisecond)
    m.model.model.layers[0].register_forward_hook(lambda *args: time.sleep(0.001))
    return m


def make_llm(model, **kw) -> LLM:
    return LLM(model, **(dict(kv_cache_tokens=256 * BS, block_size=BS, max_num_batched_tokens=64,
                              max_num_seqs=16) | kw))


@pytest.fixture
def alm(model):
    a = AsyncLLM(make_llm(model))
    yield a
    a.shutdown()


def tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def work(seed: int, count: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prefix = rand_ids(rng, 9)
    prompts = [(prefix if i % 2 else []) + rand_ids(rng, rng.randrange(3, 25)) for i in range(count)]
    params = [SamplingParams(n=1 + i % 3, temperature=0.0 if i % 4 == 0 else 0.9, top_p=0.95, seed=1000 + i,
                             max_tokens=4 + i % 9, ignore_eos=True) for i in range(count)]
    return prompts, params


def wait_until(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def assert_idle_and_clean(a: AsyncLLM) -> None:
    """Nothing in flight, the engine empty, its books balanced, blocks held only by the tree."""
    eng = a.llm.engine
    wait_until(lambda: not a.has_unfinished() and not eng.has_unfinished())
    with a.engine_lock:
        eng.check()
        assert all(c in (0, 1) for c in eng.pool.ref_counts)
        assert eng.pool.num_used == (eng.tree.num_nodes if eng.tree is not None else 0)


def test_futures_coroutines_and_streams_give_the_sequential_results(model, alm):
    prompts, params = work(1, 8)
    ref = [tokens(o) for o in make_llm(model).generate(prompts, params)]
    futs = [alm.submit(p, sp) for p, sp in zip(prompts, params)]
    assert [tokens(f.result(60)) for f in futs] == ref

    async def main():
        outs = await asyncio.gather(*(alm.generate(p, sp) for p, sp in zip(prompts, params)))
        assert [tokens(o) for o in outs] == ref

        async def deltas(p, sp):
            got = [[] for _ in range(sp.n)]
            items = [d async for d in alm.stream(p, sp)]  # deltas by default
            assert items[-1].finished and not any(d.finished for d in items[:-1])
            for d in items:
                for c in d.outputs:
                    got[c.index] += c.token_ids
            assert all(c.finish_reason == "length" for c in items[-1].outputs)
            return got, len(items)

        async def snapshots(p, sp):
            items = [d async for d in alm.stream(p, sp, delta=False)]
            assert items[-1].finished and not any(d.finished for d in items[:-1])
            final = tokens(items[-1])
            for d in items:  # every item is the output so far
                assert all(f[:len(t)] == t for t, f in zip(tokens(d), final))
            return final, len(items)

        for collect in (deltas, snapshots):
            streamed = await asyncio.gather(*(collect(p, sp) for p, sp in zip(prompts, params)))
            assert [g for g, _ in streamed] == ref
            assert max(n for _, n in streamed) > 2  # really incremental, not one final item
    asyncio.run(main())
    assert_idle_and_clean(alm)


def test_streamed_text_joins_to_the_final_text_and_never_shows_a_cut_stop_string(tiny_qwen2_dir):
    llm = LLM(str(tiny_qwen2_dir), kv_cache_tokens=2048)
    if llm.tokenizer is None:
        pytest.skip("needs the SmolLM2 tokenizer")
    prompt = "The judge reads both answers and"
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    text = llm.generate([prompt], free)[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cases = [free, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])]
    finals = [o.outputs[0] for o in llm.generate([prompt, prompt], cases)]
    assert finals[1].finish_reason == "stop" and len(finals[1].text) < len(text)
    with AsyncLLM(llm) as a:
        async def main():
            for sp, final in zip(cases, finals):
                items = [d.outputs[0] async for d in a.stream(prompt, sp, delta=True)]
                assert "".join(c.text for c in items) == final.text
                assert sum((c.token_ids for c in items), []) == final.token_ids
                assert len(items) > 2
                if sp.stop:
                    assert all(stop not in "".join(c.text for c in items[:k + 1]) for k in range(len(items)))
                snaps = [d.outputs[0] async for d in a.stream(prompt, sp, delta=False)]
                assert len(snaps) > 2 and all(final.text.startswith(c.text) for c in snaps)
                assert (snaps[-1].text, snaps[-1].token_ids) == (final.text, final.token_ids)
        asyncio.run(main())


def test_abort_from_other_threads_gives_the_partial_output(alm):
    prompt = rand_ids(random.Random(2), 12)

    async def main():
        s = alm.stream(prompt, LONG, request_id="victim", delta=True)
        first = await s.__anext__()
        assert first.outputs[0].token_ids and not first.finished
        # two callers abort the same id at once, and someone aborts an id nobody knows
        callers = [threading.Thread(target=alm.abort, args=("victim",)) for _ in range(2)]
        callers.append(threading.Thread(target=alm.abort, args=("no-such-request",)))
        for t in callers:
            t.start()
        rest = [d async for d in s]
        for t in callers:
            t.join()
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        assert 0 < sum(len(d.outputs[0].token_ids) for d in [first] + rest) < LONG.max_tokens
    asyncio.run(main())
    fut = alm.submit(prompt, LONG, request_id="victim")  # the id is free again once its request ended
    time.sleep(0.05)
    alm.abort("victim")
    out = fut.result(30)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    m = alm.metrics()
    assert m["requests_aborted"] == 2 and m["requests_submitted"] == 2
    assert_idle_and_clean(alm)


def test_timeouts_abort_the_request_and_raise_timeout_error(alm):
    prompt = rand_ids(random.Random(3), 10)
    fut = alm.submit(prompt, LONG, timeout=0.2)
    with pytest.raises(RequestTimeoutError) as err:
        fut.result(60)
    assert isinstance(err.value, TimeoutError) and err.value.output.outputs[0].finish_reason == "abort"

    async def main():
        with pytest.raises(TimeoutError):
            await alm.generate(prompt, LONG, timeout=0.2)
        with pytest.raises(RequestTimeoutError):
            async for _ in alm.stream(prompt, LONG, timeout=0.2):
                pass
        # a request with a generous timeout is untouched by it
        out = await alm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5), timeout=60)
        assert len(out.outputs[0].token_ids) == 5
    asyncio.run(main())
    assert alm.metrics()["requests_timed_out"] == 3
    assert_idle_and_clean(alm)


def test_cancelled_tasks_cancelled_futures_and_dropped_streams_abort(alm):
    prompt = rand_ids(random.Random(4), 10)

    async def main():
        task = asyncio.create_task(alm.generate(prompt, LONG))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async for _ in alm.stream(prompt, LONG):
            break  # leaves the stream unfinished; dropping it aborts the request
        s = alm.stream(prompt, LONG)
        await s.__anext__()
        await s.aclose()
    asyncio.run(main())
    fut = alm.submit(prompt, LONG)
    assert fut.cancel()
    wait_until(lambda: alm.metrics()["requests_aborted"] == 4)
    assert_idle_and_clean(alm)


def test_bad_input_raises_in_the_caller_before_anything_is_queued(alm):
    ok = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        alm.submit([5, 9999], ok)
    with pytest.raises(ValueError, match="empty"):
        alm.stream([], ok)
    with pytest.raises(ValueError, match="KV blocks|context"):
        alm.submit([5] * 10, SamplingParams(max_tokens=5000))
    with pytest.raises(TypeError, match="SamplingParams"):
        alm.submit([5], {"max_tokens": 2})
    for bad in (0, -1, float("inf"), "1", True):
        with pytest.raises(ValueError, match="timeout"):
            alm.submit([5], ok, timeout=bad)
    with pytest.raises(ValueError, match="request_id"):
        alm.submit([5], ok, request_id="")
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        alm.submit("text", ok)
    assert alm.metrics()["requests_submitted"] == 0
    held = alm.submit([5, 6], LONG, request_id="dup")
    with pytest.raises(ValueError, match="already in flight"):
        alm.submit([7], ok, request_id="dup")
    alm.abort("dup")
    assert held.result(30).outputs[0].finish_reason == "abort"
    assert_idle_and_clean(alm)


def test_the_sync_llm_api_while_an_async_llm_drives_the_engine(model):
    prompts, params = work(5, 6)
    llm = make_llm(model)
    ref = [tokens(o) for o in llm.generate(prompts, params)]
    a = AsyncLLM.of(llm)
    try:
        assert AsyncLLM.of(llm) is a and a.llm is llm and a.tokenizer is llm.tokenizer
        with pytest.raises(ValueError, match="already driven"):
            AsyncLLM(llm)
        with pytest.raises(RuntimeError, match="AsyncLLM"):
            llm.step()
        with pytest.raises(RuntimeError, match="AsyncLLM"):
            llm.add_request([5], SamplingParams())
        # generate() from several threads while async callers share the engine
        results: list = [None] * 3

        def call(i):
            results[i] = [tokens(o) for o in llm.generate(prompts, params)]
        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        futs = [a.submit(p, sp) for p, sp in zip(prompts, params)]
        for t in threads:
            t.join(120)
        assert results == [ref] * 3 and [tokens(f.result(60)) for f in futs] == ref
        fut = a.submit(prompts[0], LONG, request_id="x")
        assert llm.abort("x") is None  # forwarded: the waiter gets the output
        assert fut.result(30).outputs[0].finish_reason == "abort"
        assert_idle_and_clean(a)
        llm.reset_metrics()
        llm.invalidate_prefix_cache()
        assert llm.engine.pool.num_used == 0
    finally:
        a.shutdown()
    # detached: the caller-driven API is back, on the same engine
    assert llm.driver is None and llm.step() == []
    assert [tokens(o) for o in llm.generate(prompts, params)] == ref
    b = AsyncLLM.of(llm)
    assert b is not a
    b.shutdown()


def test_a_failed_step_fails_only_its_own_requests_while_many_wait(model):
    prompts, params = work(6, 24)
    ref = [tokens(o) for o in make_llm(model).generate(prompts, params)]
    with AsyncLLM(make_llm(model)) as a:
        fault = Fault(a.llm.engine, None, at=4)
        handle = a.llm.engine.model.model.layers[1].register_forward_hook(fault.hook)
        try:
            futs: dict[str, object] = {}
            lock = threading.Lock()

            def caller(k):
                for i in range(k, len(prompts), 4):
                    f = a.submit(prompts[i], params[i], request_id=f"r{i}")
                    with lock:
                        futs[f"r{i}"] = f
            threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            failed = set()
            for i in range(len(prompts)):
                try:
                    assert tokens(futs[f"r{i}"].result(60)) == ref[i]
                except RequestFailedError as e:
                    assert isinstance(e.__cause__, InjectedFault) and e.request_id == f"r{i}"
                    assert e.output.error.startswith("InjectedFault")
                    failed.add(e.request_id)
        finally:
            handle.remove()
        assert fault.fired and failed == fault.touched and 0 < len(failed) < len(prompts)
        m = a.metrics()
        assert m["requests_failed"] == len(failed) and m["failed_steps"] == 1
        assert_idle_and_clean(a)
        # and the loop goes on
        assert tokens(a.submit(prompts[0], params[0]).result(60)) == ref[0]


def test_shutdown_with_requests_in_flight_answers_every_waiter(model):
    llm = make_llm(model)
    a = AsyncLLM(llm)
    prompt = rand_ids(random.Random(7), 10)
    futs = [a.submit(prompt + [3 + i], LONG) for i in range(6)]
    outcome: list = []

    def consume():
        async def main():
            try:
                async for _ in a.stream(prompt, LONG):
                    pass
            except EngineDeadError as e:
                outcome.append(e)
        asyncio.run(main())
    t = threading.Thread(target=consume)
    t.start()
    wait_until(lambda: a.metrics()["generated_tokens"] > 20)
    a.shutdown()
    t.join(30)
    assert not t.is_alive() and len(outcome) == 1
    for f in futs:
        with pytest.raises(EngineDeadError, match="shut down"):
            f.result(5)
    with pytest.raises(EngineDeadError):
        a.submit(prompt, LONG)
    a.shutdown()  # idempotent
    assert not llm.engine.has_unfinished()
    llm.engine.check()
    assert llm.generate([prompt], SamplingParams(max_tokens=3))[0].finished  # detached, usable


def test_a_dead_loop_answers_every_waiter_and_refuses_new_work(model):
    """A step that fails with no request to blame is not rolled onto anyone: the loop ends and
    every waiter, present and future, gets EngineDeadError naming the cause."""
    llm = make_llm(model)
    a = AsyncLLM(llm)
    eng = llm.engine
    fault = Fault(eng, eng.scheduler.schedule, at=1)
    eng.scheduler.schedule = fault
    with a.engine_lock:  # the loop cannot step (and die) before all three are submitted
        futs = [a.submit([5, 6, 7], SamplingParams(max_tokens=3)) for _ in range(3)]
    for f in futs:
        with pytest.raises(EngineDeadError, match="InjectedFault") as err:
            f.result(30)
        assert isinstance(err.value.__cause__, InjectedFault)
    with pytest.raises(EngineDeadError, match="InjectedFault"):
        a.submit([5], SamplingParams())
    with pytest.raises(EngineDeadError):
        llm.generate([[5]], SamplingParams())
    assert AsyncLLM.of(llm) is a  # still attached: the engine is not handed back silently


def test_the_idle_loop_sleeps_on_its_condition(alm):
    alm.submit([5, 6, 7], SamplingParams(max_tokens=3)).result(30)
    assert_idle_and_clean(alm)
    steps = alm.metrics()["steps"]
    time.sleep(0.2)
    frame = sys._current_frames()[alm._thread.ident]
    assert frame.f_code.co_name == "wait" and frame.f_code.co_filename.endswith("threading.py")
    assert alm.metrics()["steps"] == steps


def test_tensor_parallel_ranks_are_refused():
    """Ranks of a tensor-parallel process group must step in lockstep; a loop per rank would not.
    (LLM(path, tensor_parallel_size=N) built in one process is driven: tests/test_tp_async.py.)"""
    llm = make_llm(small_model())
    model = llm.engine.model  # what shard_for_engine leaves on a sharded decoder:
    model.serve_with(model.serving.replace(gather_logits=lambda x: x))
    with pytest.raises(ValueError, match="one rank of a tensor-parallel process group .* tensor_parallel_size=N"):
        AsyncLLM(llm)
    assert llm.driver is None


def test_a_plain_llm_called_from_many_threads_serialises_its_calls(model):
    """Without an AsyncLLM, sync calls from a thread pool wait for each other instead of
    corrupting the engine; an AsyncLLM attaching meanwhile waits for the call in progress and
    the later calls go through it."""
    prompts, params = work(8, 6)
    llm = make_llm(model)
    ref = [tokens(o) for o in make_llm(model).generate(prompts, params)]
    results: dict[int, object] = {}

    def call(i):
        try:
            results[i] = [tokens(o) for o in llm.generate(prompts, params)]
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e
    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads[:3]:
        t.start()
    time.sleep(0.05)
    a = AsyncLLM.of(llm)
    for t in threads[3:]:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert [results[i] for i in range(6)] == [ref] * 6
        assert_idle_and_clean(a)
    finally:
        a.shutdown()
