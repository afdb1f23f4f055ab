"""One Judge (and a second one) over one LLM, called at once from threads, several event loops, an
AsyncJudge and with timeouts: every result equals the same item judged alone (votes are seeded by
content), a timed-out item is "timeout" and nothing else, no call raises, and the engine ends idle
with its cache invariants intact. Tiny random Qwen2; its votes are forced (truncated), which puts the
forced continuations in the mix too. The slow variant is the issue's soak size: 8 threads x 50 calls
and 4 event loops (each 5 rounds of plain, timed-out and AsyncJudge batches plus a ranking)."""
from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

import rrm_engine as rrm
from rrm_engine.judge import AsyncJudge, Judge
from test_judge_engine import wait_idle

ITEMS = [(f"Question {q}?", f"Answer {a}.", f"Reply {b}!") for q in range(3) for a, b in ((0, 1), (2, 3))]
RANK = ("Pick the best.", ["One.", "Two.", "Three.", "Four."])
JUDGE_KW = dict(votes=2, max_tokens=4, temperature=0.6, seed=11)


@pytest.fixture(scope="module")
def llm(tiny_qwen2_dir, smollm2_tokenizer):
    llm = rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=16384)
    yield llm
    Judge(llm).engine.shutdown()


def plain(c):
    """What must match exactly (texts, tokens, verdicts) and what within float noise of batching (p_first)."""
    assert c.error is None, c.error
    return ([(v.token_ids, v.verdict, v.forced, v.reason) for v in c.votes], c.counts, c.winner,
            [pytest.approx(v.p_first, abs=1e-5) for v in c.votes])


@pytest.mark.parametrize("threads, calls, loops", [
    (4, 6, 3),
    pytest.param(8, 50, 4, marks=pytest.mark.slow),  # the soak: 8 threads x 50 calls + 4 event loops
])
def test_threads_loops_timeouts_equal_sequential(llm, threads, calls, loops):
    judge, twin = Judge(llm, **JUDGE_KW), Judge(llm, **JUDGE_KW)
    one_async = AsyncJudge(judge, timeout=60)  # one AsyncJudge used from every event loop at once
    alone = {item: plain(judge.compare(*item)) for item in ITEMS}
    rank_alone = judge.rank(*RANK)
    errors: list[BaseException] = []
    checked = {"equal": 0, "timeout": 0}
    lock = threading.Lock()

    def check(item, c):
        with lock:
            if c.error == "timeout":
                checked["timeout"] += 1
                assert c.winner is None and not c.votes
            else:
                assert plain(c) == alone[item]
                checked["equal"] += 1

    def guarded(fn):
        def run(*args):
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    def sync_caller(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(calls):
            item = rng.choice(ITEMS)
            check(item, rng.choice((judge, twin)).compare(*item))

    async def loop_caller(seed: int) -> None:
        for round_ in range(max(1, calls // 10)):
            await loop_round(seed * 1000 + round_)

    async def loop_round(seed: int) -> None:
        rng = random.Random(seed)
        batch = rng.sample(ITEMS, 3)
        outs = await asyncio.gather(*(judge.acompare(*it) for it in batch),
                                    twin.acompare_batch(batch, errors="return", timeout=rng.choice((0.0, 0.02, None))),
                                    one_async.compare_batch(batch))
        for it, c in zip(batch, outs[:3]):
            check(it, c)
        for it, c in zip(batch, outs[3]):
            check(it, c)
        for it, c in zip(batch, outs[4]):
            check(it, c)
        r = await judge.arank(*RANK)
        assert r.order == rank_alone.order and [plain(m.comparison) for m in r.matches] == [
            plain(m.comparison) for m in rank_alone.matches]

    workers = [threading.Thread(target=guarded(sync_caller), args=(s,)) for s in range(threads)]
    workers += [threading.Thread(target=guarded(lambda s: asyncio.run(loop_caller(s))), args=(100 + s,))
                for s in range(loops)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=900)
    assert not any(t.is_alive() for t in workers), "a caller hung"
    assert not errors, errors
    rounds = loops * max(1, calls // 10)
    assert checked["equal"] + checked["timeout"] == threads * calls + rounds * 9  # every call answered, checked
    assert checked["equal"] >= threads * calls + rounds * 6  # only the timed-out batches may be missing
    wait_idle(llm)
    llm.engine.check()


def test_sync_call_inside_the_judge_loop_is_refused_not_a_deadlock(llm):
    judge = Judge(llm, **JUDGE_KW)

    async def inside():
        from rrm_engine.judge.background_loop import run_sync
        return run_sync(asyncio.sleep(0))

    from rrm_engine.judge.background_loop import run_sync
    with pytest.raises(RuntimeError, match="deadlock"):
        run_sync(inside())
    assert judge.compare(*ITEMS[0]).error is None  # the loop still serves


def test_lockstep_engine_judges_as_the_async_engine(llm, tiny_qwen2_dir):
    """The stepping a tensor-parallel LLM gets (lockstep_engine.py), here on a plain LLM of the same
    weights: the same comparisons, adaptive ones and rankings as through the AsyncLLM, from the sync
    API and from another event loop."""
    from rrm_engine.judge.background_loop import background_loop
    from rrm_engine.async_engine.lockstep import LockstepEngine

    plain = rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=16384)
    for kw in (JUDGE_KW, {**JUDGE_KW, "votes": 5, "adaptive": True}):
        ref, lock = Judge(llm, **kw), Judge(plain, **kw)
        lock._engine = LockstepEngine(plain, background_loop())
        assert [plain_c(c) for c in lock.compare_batch(ITEMS)] == [plain_c(c) for c in ref.compare_batch(ITEMS)]
        got = asyncio.run(lock.arank(*RANK))  # from another loop: hops to the background loop
        assert got.order == ref.rank(*RANK).order
    assert not plain.has_unfinished()


def plain_c(c):
    return plain(c) + (c.votes_aborted,)
