"""The HTTP front over 2 engine replicas on a local Ray cluster (serve --data-parallel-size 2; tiny
random Qwen2 with the SmolLM2 tokenizer), driven by a real HTTP client: judge answers equal to one
in-process judge's (votes are seeded by item content), both replicas used, completions (n > 1, plain
and streamed) equal to one engine's with the same seed, per-replica /metrics, and a replica killed
mid-burst loses and duplicates no request while /health says degraded until it is back."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from approx_results import approx_fields
from live_server import live_server
from test_ray_pool import start_local_ray

httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'rrm_engine[ray]'")

import rrm_engine as rrm  # noqa: E402
from rrm_engine.judge import Judge  # noqa: E402
from rrm_engine.judge.pool import JudgePool  # noqa: E402
from rrm_engine.llm import LLM  # noqa: E402
from rrm_engine.judge.results import comparison_from_dict  # noqa: E402
from rrm_engine.serving.server import build_app  # noqa: E402

LLM_KW = dict(device="cpu", dtype=torch.float32, kv_cache_tokens=4096)
JUDGE_KW = dict(votes=2, max_tokens=6, temperature=0.7, seed=3)
QUERIES = ["What is the capital of France?", "Name a prime.", "Say hello.", "Pick a colour."]
ITEMS = [[q, f"{q} yes {i}", f"no {i}"] for q in QUERIES for i in range(2)]


@pytest.fixture(scope="module")
def dp(tiny_qwen2_dir, smollm2_tokenizer):
    start_local_ray()
    pool = JudgePool(str(tiny_qwen2_dir), num_replicas=2, llm_kwargs=LLM_KW, judge_kwargs=JUDGE_KW, num_cpus=0.5,
                     start_timeout=120, max_restarts=2)
    reference = Judge(rrm.LLM(str(tiny_qwen2_dir), **LLM_KW), **JUDGE_KW)
    try:
        with live_server(build_app(pool, "tiny")) as url, httpx.Client(base_url=url, timeout=120) as http:
            yield pool, reference, http
    finally:
        pool.shutdown()
        reference.engine.shutdown()
        ray.shutdown()


def replica_series(http, name: str) -> dict[str, float]:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{"):
            out[line.split('replica="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def total(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


# first: the replicas' prefix caches are still empty
def test_prefill_of_a_judged_batch_grows_by_at_most_the_shared_prefix_per_extra_replica(dp, tiny_qwen2_dir):
    """Routing by query keeps each query's prefix on one replica: with 2 replicas the batch computes at
    most one more copy of what all queries share (the system prompt up to the query) than one replica."""
    pool, _, _ = dp
    model_dir = str(tiny_qwen2_dir)
    items = [(f"Fresh query number {q}?", f"answer {i} to {q}", f"other {i}") for q in range(4) for i in range(3)]
    one = Judge(LLM(model_dir, **LLM_KW), **JUDGE_KW)  # one replica's engine, in this process
    one.compare_batch(items)
    prefill_one = one.engine.metrics()["prefill_tokens_computed"]
    before = {i: m["prefill_tokens_computed"] for i, m in pool.replica_metrics().items()}
    used: set[int] = set()
    pool.on_dispatch = lambda rid, idx: used.add(rid)
    pool.compare_batch(items)
    pool.on_dispatch = None
    prefill_two = sum(m["prefill_tokens_computed"] - before[i] for i, m in pool.replica_metrics().items())
    # the token prefix two different queries' prompts share (both presentation orders alike)
    p0, p1 = (one.builder.build(q, a, b).token_ids for q, a, b in (items[0], items[3]))
    shared = next((i for i, (x, y) in enumerate(zip(p0, p1)) if x != y), min(len(p0), len(p1)))
    print(f"prefill of the batch: N=1 {prefill_one} tokens, N=2 {prefill_two} tokens; shared prefix {shared}")
    assert len(used) == 2 and shared > 0
    assert prefill_two <= prefill_one + (len(used) - 1) * shared, (prefill_one, prefill_two, shared)


def test_judge_routes_equal_one_judge_and_use_both_replicas(dp):
    pool, reference, http = dp
    assert http.get("/health").json() == {"status": "ok"}
    r = http.post("/v1/judge/compare", json={"items": ITEMS, "texts": True})
    assert r.status_code == 200, r.text
    got = [comparison_from_dict(c) for c in r.json()["results"]]
    want = reference.compare_batch([tuple(i) for i in ITEMS])
    assert [approx_fields(c, 1e-5) for c in got] == [approx_fields(c, 1e-5) for c in want]
    requests = replica_series(http, "rrm_replica_requests_total")
    assert set(requests) == {"0", "1"} and all(v > 0 for v in requests.values())
    gen = replica_series(http, "rrm_replica_generated_tokens_total")
    assert total(http, "rrm_generated_tokens_total") == sum(gen.values()) > 0
    assert set(replica_series(http, "rrm_replica_kv_use_ratio")) == {"0", "1"}
    assert total(http, "rrm_replicas_live") == 2
    rank = http.post("/v1/judge/rank", json={"items": [[q, ["a", "bb", "ccc"]] for q in QUERIES[:2]]})
    assert [x["order"] for x in rank.json()["results"]] == [
        r.order for r in reference.rank_batch([(q, ["a", "bb", "ccc"]) for q in QUERIES[:2]])]


def test_completions_with_n_equal_one_engines(dp):
    pool, reference, http = dp
    body = {"prompt": "Once upon a time", "max_tokens": 6, "n": 3, "seed": 5}
    plain = http.post("/v1/completions", json=body)
    assert plain.status_code == 200, plain.text
    ids = reference.llm.tokenizer("Once upon a time")["input_ids"]
    want = reference.engine.submit(ids, rrm.SamplingParams(n=3, seed=5, max_tokens=6)).result(timeout=60)
    assert [c["text"] for c in plain.json()["choices"]] == [o.text for o in want.outputs]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    for i, o in enumerate(want.outputs):
        assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"][0]["index"] == i) == o.text


def test_the_python_scorer_api_is_the_same_pool(dp):
    pool, reference, _ = dp
    items = [tuple(i) for i in ITEMS[:3]]
    assert [approx_fields(c, 1e-5) for c in pool.compare_batch(items)] == [
        approx_fields(c, 1e-5) for c in reference.compare_batch(items)]


# last: it kills a replica of the module's pool
def test_a_replica_killed_mid_burst_loses_no_request(dp):
    pool, reference, http = dp
    burst = [[[q, f"{q} burst {i}", f"other {i}"]] for q in QUERIES for i in range(2)]  # 8 requests
    want = [reference.compare_batch([tuple(b[0])])[0] for b in burst]
    killed: list[int] = []

    def kill_once(rid: int, idx: list[int]) -> None:
        if not killed:  # the first call of the burst: its replica holds work and has not answered
            killed.append(rid)
            ray.kill(pool.replicas[rid].handle, no_restart=True)

    died_before = pool.stats.replicas_died
    pool.on_dispatch = kill_once
    seen: list[str] = []  # /health while the burst runs and the replacement starts
    try:
        with ThreadPoolExecutor(9) as ex:
            answers = ex.map(lambda b: http.post("/v1/judge/compare", json={"items": b, "texts": True}), burst)
            while not killed or pool.stats.replicas_died == died_before:
                time.sleep(0.01)
            seen.append(http.get("/health").json()["status"])  # right after the death is seen
            answers = list(answers)
    finally:
        pool.on_dispatch = None
    assert [a.status_code for a in answers] == [200] * len(burst)
    got = [comparison_from_dict(a.json()["results"][0]) for a in answers]
    assert [approx_fields(c, 1e-5) for c in got] == [approx_fields(c, 1e-5) for c in want]
    assert pool.stats.replicas_died == died_before + 1 and pool.stats.duplicates_ignored == 0
    assert pool.stats.resubmitted_items >= 1
    assert seen == ["degraded"]  # the replacement loads a model: seconds after the death
    deadline = time.monotonic() + 120
    while http.get("/health").json()["status"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert http.get("/health").json() == {"status": "ok"}
    assert total(http, "rrm_replica_deaths_total") >= 1 and total(http, "rrm_replica_restarts_total") >= 1



def test_a_completion_whose_replica_dies_is_resubmitted(dp):
    """A plain completion in flight when its replica is killed: sent again to the live replica,
    answered once, the same as one engine's with the same seed."""
    pool, reference, http = dp
    deadline = time.monotonic() + 120
    while http.get("/health").json()["status"] != "ok" and time.monotonic() < deadline:  # after the burst test
        time.sleep(0.2)
    body = {"prompt": "Tell me a long story", "max_tokens": 96, "n": 2, "seed": 11, "ignore_eos": True}
    resubmitted = pool.stats.resubmitted_items
    with ThreadPoolExecutor(1) as ex:
        answer = ex.submit(http.post, "/v1/completions", json=body)
        while not pool.engine._where and not answer.done():  # until the request is on a replica
            time.sleep(0.005)
        rep = next(iter(pool.engine._where.values()))
        ray.kill(rep.handle, no_restart=True)
        r = answer.result()
    assert r.status_code == 200, r.text
    assert pool.stats.resubmitted_items == resubmitted + 1
    ids = reference.llm.tokenizer("Tell me a long story")["input_ids"]
    want = reference.engine.submit(ids, rrm.SamplingParams(n=2, seed=11, max_tokens=96, ignore_eos=True)).result(
        timeout=120)
    assert [c["text"] for c in r.json()["choices"]] == [o.text for o in want.outputs]

def _env() -> dict:
    import os
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # its own local Ray
    return env


@pytest.mark.slow  # its own Ray and 2 replicas in a subprocess: ~1-2 min on 2 busy cores
def test_serve_command_with_two_replicas(tiny_qwen2_dir, smollm2_tokenizer, tmp_path):
    from live_server import free_port
    from live_server import serve_process
    port = free_port()
    args = ["--model", str(tiny_qwen2_dir), "--device", "cpu", "--kv-cache-tokens", "4096", "--votes", "1",
            "--max-tokens", "3", "--log-level", "warning", "--data-parallel-size", "2", "--replica-cpus", "0.5"]
    with serve_process(args, port, start_timeout=240, env=_env()):
        r = httpx.post(f"http://127.0.0.1:{port}/v1/judge/compare", json={"items": ITEMS}, timeout=120)
        assert r.status_code == 200 and all(len(c["votes"]) == 1 for c in r.json()["results"])
        import subprocess
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert sum("ray::ReplicaActor" in line for line in ps.splitlines()) >= 2, ps[-2000:]
    # a replica that cannot start fails serve at start-up with its error (exit 2, one line)
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "rrm_engine", "serve", "--model", str(bad), "--port", str(free_port()),
                             "--device", "cpu", "--data-parallel-size", "2", "--replica-cpus", "0.5"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 2 and "failed to start" in out, out[-2000:]
