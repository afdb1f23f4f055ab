"""Tensor parallelism behind the async engine: LLM(path, tensor_parallel_size=2) built in this process
(two forked gloo ranks on CPU) driven by one AsyncLLM, and so by every Judge and by the server, gives
what the same calls give on one process (TP=1), with requests from several threads at once.

Why equal tokens are the right bar: greedy and seeded draws depend only on the logits and (seed,
sample, token index), not on the batch (sampler.py); the ranks' logits equal one process's within
1e-5 (test_tensor_parallel.py), far below the gaps between the tiny model's top logits. One TP=2 LLM
serves the whole module: starting its ranks is most of the cost.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from approx_results import approx_fields
from live_server import free_port, live_server, serve_process

from rrm_engine import LLM, AsyncLLM, SamplingParams
from rrm_engine.distributed.tp_workers import WorkerEngine
from rrm_engine.judge import Judge
from rrm_engine.judge.results import comparison_from_dict

KW = dict(device="cpu", dtype=torch.float32, kv_cache_tokens=4096)
PAIRS = [("What is the capital of France?", "Paris.", "Berlin."), ("Name a prime.", "7", "8")]


@pytest.fixture(scope="module")
def two(tiny_qwen2_dir):
    llm = LLM(str(tiny_qwen2_dir), tensor_parallel_size=2, **KW)
    assert isinstance(llm.engine, WorkerEngine) and llm.tensor_parallel
    yield llm
    if llm.driver is not None:
        llm.driver.shutdown()
    llm.engine.shutdown()


@pytest.fixture(scope="module")
def one(tiny_qwen2_dir):
    llm = LLM(str(tiny_qwen2_dir), **KW)
    yield llm
    if llm.driver is not None:
        llm.driver.shutdown()


def work() -> list[tuple[list[int], SamplingParams]]:
    """Greedy and seeded sampled requests (n=2 forks after a shared prefill), some sharing a prefix."""
    shared = [(37 * i + 11) % 4000 for i in range(24)]
    out = []
    for k in range(8):
        prompt = shared + [100 + k, 7 * k + 1] if k % 2 else [5 + k, 6, 7, 8, 9 + k]
        if k % 3 == 0:
            sp = SamplingParams(temperature=0.0, max_tokens=6 + k, ignore_eos=True)
        else:
            sp = SamplingParams(temperature=0.8, top_p=0.9, seed=k, n=2, max_tokens=5 + k, ignore_eos=True)
        out.append((prompt, sp))
    return out


def tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def run_from_threads(a: AsyncLLM, jobs) -> list[list[list[int]]]:
    """Every job submitted from one of 4 threads, as they come; results in job order."""
    def submit(job):
        return tokens(a.submit(*job).result(timeout=120))
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(submit, jobs))


def test_async_llm_drives_two_ranks_like_one(one, two):
    jobs = work()
    a2, a1 = AsyncLLM.of(two), AsyncLLM.of(one)
    want = run_from_threads(a1, jobs)
    got = run_from_threads(a2, jobs)
    assert got == want
    assert [len(t) for t in got[0]] == [6] and [len(t) for t in got[1]] == [6, 6]

    async def streamed() -> list[int]:  # a stream's deltas join into the final tokens
        ids: list[int] = []
        async for item in a2.stream(*jobs[3]):
            ids += item.outputs[0].token_ids
        return ids
    assert asyncio.run(streamed()) == want[3][0]

    # abort from another thread while it runs: the waiter gets the output, finish_reason "abort"
    fut = a2.submit([3, 4, 5], SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True), request_id="long")
    deadline = time.monotonic() + 60
    while a2.metrics()["running"] == 0 and not fut.done():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    m = a2.metrics()
    assert m["requests_in_flight"] == 1 and m["running"] == 1 and m["waiting"] == 0
    threading.Thread(target=a2.abort, args=("long",)).start()
    out = fut.result(timeout=60)
    assert out.request_id == "long" and out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids
    # a bad request is refused in the caller's thread (validated here, no round trip), nothing queued
    with pytest.raises(ValueError, match="outside the vocabulary"):
        a2.submit([10 ** 7], SamplingParams())
    with pytest.raises(ValueError, match="does not fit the model's context"):
        a2.submit([1] * 5000, SamplingParams())
    # LLM.generate goes through the loop while attached; the ranks are left empty
    assert [tokens(o) for o in two.generate([j[0] for j in jobs[:2]], [j[1] for j in jobs[:2]])] == want[:2]
    assert a2.metrics()["requests_in_flight"] == 0 and not two.has_unfinished()
    # shut down: the LLM steps its ranks itself again, with the same answers
    a2.shutdown()
    assert two.driver is None
    assert tokens(two.generate([jobs[0][0]], jobs[0][1])[0]) == want[0]


def test_judge_over_two_ranks_equals_one(one, two):
    j1 = Judge(one, votes=2, max_tokens=6, temperature=0.6, seed=3)
    j2 = Judge(two, votes=2, max_tokens=6, temperature=0.6, seed=3)
    got = j2.compare_batch(PAIRS)
    assert isinstance(j2.engine, AsyncLLM) and j2.engine is AsyncLLM.of(two)  # not the lockstep path
    want = j1.compare_batch(PAIRS)
    assert [approx_fields(c, 1e-5) for c in got] == [approx_fields(c, 1e-5) for c in want]
    assert all(len(v.token_ids) > 0 for c in got for v in c.votes)


@contextlib.contextmanager
def served(judge: Judge):
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from rrm_engine.serving.server import build_app

    with live_server(build_app(judge, "tiny")) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def test_server_over_two_ranks_answers_like_one(one, two):
    completion = {"prompt": "The capital of France is", "max_tokens": 6, "n": 2, "temperature": 0.8, "seed": 7,
                  "logprobs": 2}
    compare = {"items": [{"query": q, "a": a, "b": b} for q, a, b in PAIRS]}
    answers = []
    for llm in (two, one):
        with served(Judge(llm, votes=2, max_tokens=5, temperature=0.6, seed=11)) as http:
            c = http.post("/v1/completions", json=completion)
            j = http.post("/v1/judge/compare", json=compare)
            metrics = http.get("/metrics")
        assert c.status_code == j.status_code == metrics.status_code == 200, (c.text, j.text)
        assert "rrm_requests_total" in metrics.text
        answers.append((c.json(), j.json()))
    (c2, j2), (c1, j1) = answers
    for a, b in zip(c2["choices"], c1["choices"]):
        assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-5)
    assert c2["usage"] == c1["usage"] and len(c2["choices"]) == 2
    assert ([approx_fields(comparison_from_dict(d), 1e-5) for d in j2["results"]]
            == [approx_fields(comparison_from_dict(d), 1e-5) for d in j1["results"]])
    assert j2["stats"] == j1["stats"]


BAD_REQUESTS = [
    ([10 ** 7], SamplingParams()),
    ([], SamplingParams()),
    ([1, True], SamplingParams()),
    ("1 2", SamplingParams()),
    ([1] * 2048, SamplingParams()),
    ([1, 2], SamplingParams(stop_token_ids=[10 ** 7])),
    ([1, 2], "greedy"),
]


@pytest.mark.parametrize("ids,params", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_validation_here_is_the_ranks_validation(one, two, ids, params):
    """The WorkerEngine validates in the caller's process (no round trip) with Engine.validate over
    the ranks' limits: the same error, word for word, as an engine in this process."""
    with pytest.raises((ValueError, TypeError)) as want:
        one.engine.validate(ids, params)
    with pytest.raises(type(want.value)) as got:
        two.engine.validate(ids, params)
    assert str(got.value) == str(want.value)
    two.engine.validate([1, 2, 3], SamplingParams(stop=["x"], max_tokens=10))  # and what is fine is fine


@pytest.mark.slow
def test_serve_command_with_two_ranks(one, tiny_qwen2_dir):
    """`python -m rrm_engine serve --tensor-parallel-size 2`: its judge route answers as a judge over
    one process; SIGTERM stops the server and its ranks."""
    import os
    import signal

    from test_tp_plain_script import running

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    port = free_port()
    args = ["--model", str(tiny_qwen2_dir), "--device", "cpu", "--dtype", "float32", "--kv-cache-tokens", "4096",
            "--votes", "2", "--max-tokens", "4", "--seed", "5", "--tensor-parallel-size", "2", "--log-level", "warning"]
    with serve_process(args, port, start_timeout=180) as proc:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/judge/compare", json={"items": [list(p) for p in PAIRS]},
                       timeout=120)
        assert r.status_code == 200, r.text
        want = Judge(one, votes=2, max_tokens=4, seed=5).compare_batch(PAIRS)
        assert ([approx_fields(comparison_from_dict(d), 1e-5) for d in r.json()["results"]]
                == [approx_fields(c, 1e-5) for c in want])
        proc.terminate()
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once it has stopped
    deadline = time.monotonic() + 30  # no exit handler ran: the ranks leave when they see their parent gone
    while alive := [pid for pid in workers if running(pid)]:
        if time.monotonic() > deadline:
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"ranks {alive} outlived serve")
        time.sleep(0.2)
