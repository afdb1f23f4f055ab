"""Clients under real timeouts, against the HTTP server on a loopback port (uvicorn in a thread, the tiny
random Qwen2 judging slowly enough, about 3 s a judgment, for a client to give up in the middle):

  * a judgment with an idempotency key outlives a dropped connection, and the retry joins it: the same
    result, and the engine did the work once (its request and token counters, rrm_judgments_*);
  * JudgeClient's retries (per-attempt timeouts shorter than the judgment) get the judgment's result;
  * a finished judgment is replayed, a key reused for another body refused, a failure not kept, an
    abandoned judgment cancelled after the grace period;
  * OpenRLHF's client, reproduced from OpenRLHF 0.11.2 (openrlhf/utils/agent.py,
    SingleTurnAgentExecutor._fetch_rewards_via_http: aiohttp total timeout 180 s, raise_for_status,
    5 tries 1 s apart, the same JSON body each time; here httpx with a 1 s timeout), gets the rewards
    of a judgment longer than its timeout, and labels of any JSON type;
  * JudgeClient's retry rules on 5xx / 429 / 4xx / refused connections / its deadline, against a
    small scripted HTTP server (the statuses a proxy or an overloaded server would answer).
"""
from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

import rrm_engine as rrm  # noqa: E402
from rrm_engine.judge import Judge  # noqa: E402
from rrm_engine.judge.results import comparison_to_dict  # noqa: E402
from rrm_engine.serving import JudgeClient  # noqa: E402
from rrm_engine.serving.idempotency import Judgments  # noqa: E402
from rrm_engine.serving.server import build_app  # noqa: E402
from live_server import live_server  # noqa: E402

Q = "What is the capital of France?"
GRACE = 3.0  # seconds a keyed judgment outlives its client (the server's setting in these tests)


@pytest.fixture(scope="module")
def srv(tiny_qwen2_dir, smollm2_tokenizer):
    llm = rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=16384)
    judge = Judge(llm, votes=2, max_tokens=400, temperature=0.6, seed=3)  # random weights: votes run to 400
    judgments = Judgments(ttl=60.0, grace=GRACE)
    app = build_app(judge, "tiny", judgments=judgments)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield SimpleNamespace(url=url, http=client, llm=llm, judge=judge, judgments=judgments)
    judge.engine.shutdown()


COUNTERS = {"requests": "rrm_requests_total", "generated": "rrm_generated_tokens_total",
            "started": "rrm_judgments_started_total", "joined": "rrm_judgments_joined_total",
            "replayed": "rrm_judgments_replayed_total", "abandoned": "rrm_judgments_abandoned_total",
            "running": "rrm_judgments_running", "queue": "rrm_queue_depth"}


def metrics(srv) -> dict:
    values = {}
    for line in srv.http.get("/metrics").text.splitlines():
        name, _, v = line.partition(" ")
        values[name] = v
    return {k: float(values[n]) for k, n in COUNTERS.items()}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in ("requests", "generated", "started", "joined", "replayed", "abandoned")}


def wait_for(cond, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def approx(v, atol: float = 1e-5):
    """JSON results with every float as pytest.approx (log-probs move in the last digits with batching)."""
    if isinstance(v, float):
        return pytest.approx(v, abs=atol)
    if isinstance(v, dict):
        return {k: approx(w, atol) for k, w in v.items()}
    if isinstance(v, (list, tuple)):
        return [approx(w, atol) for w in v]
    return v


def body(*items, **kw) -> dict:
    return {"items": [list(x) for x in items], **kw}


def test_a_retry_after_a_dropped_connection_joins_the_judgment(srv):
    b = body((Q, "Paris.", "Berlin."))
    m0 = metrics(srv)
    with pytest.raises(httpx.ReadTimeout):  # the first connection drops mid-judgment
        httpx.post(f"{srv.url}/v1/judge/compare", json=b, headers={"Idempotency-Key": "drop-1"},
                   timeout=httpx.Timeout(60, read=0.5))
    assert metrics(srv)["running"] == 1  # not aborted with its client
    retry = srv.http.post("/v1/judge/compare", json=b, headers={"Idempotency-Key": "drop-1"})
    assert retry.status_code == 200
    m1 = metrics(srv)
    keyed = delta(m1, m0)
    assert (keyed["started"], keyed["joined"], keyed["abandoned"]) == (1, 1, 0)
    # the same judgment once more, unkeyed: what one judgment costs the engine, and its result
    alone = srv.http.post("/v1/judge/compare", json=b)
    single = delta(metrics(srv), m1)
    assert single["started"] == 1 and single["requests"] > 0
    assert keyed["requests"] == single["requests"] and keyed["generated"] == single["generated"]
    assert approx(retry.json()["results"]) == alone.json()["results"]
    want = srv.judge.compare_batch([(Q, "Paris.", "Berlin.")])  # and what the judge says in process
    assert approx(retry.json()["results"]) == [comparison_to_dict(c) for c in want]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_judge_client_retries_shorter_than_the_judgment(srv, mode):
    """Every attempt gives up after 0.4 s; the judgment takes seconds. Each retry joins it (the key is the
    call's), the last one gets its result, and it ran once."""
    items = [(Q, "Lyon.", "Paris.")] if mode == "sync" else [("Name a prime.", "7", "8")]
    client = JudgeClient(srv.url, timeout=0.4, retries=100, backoff=0.05, max_backoff=0.2)
    m0 = metrics(srv)
    if mode == "sync":
        got = client.compare_batch(items)
    else:
        got = asyncio.run(client.acompare_batch(items))
    d = delta(metrics(srv), m0)
    assert client.attempts > 1 and d["started"] == 1
    assert 1 <= d["joined"] + d["replayed"] <= client.attempts - 1  # (an attempt may time out before it arrives)
    assert approx([comparison_to_dict(c) for c in got]) == [comparison_to_dict(c) for c in
                                                                        srv.judge.compare_batch(items)]
    client.close()


def test_replay_conflict_and_failures(srv):
    b = body((Q, "Berlin.", "Paris."), votes=1)
    first = srv.http.post("/v1/judge/compare", json={**b, "idempotency_key": "body-key"})  # the body field
    m0 = metrics(srv)
    again = srv.http.post("/v1/judge/compare", json={**b, "idempotency_key": "body-key"})
    d = delta(metrics(srv), m0)
    assert again.json() == first.json() and (d["replayed"], d["started"], d["requests"]) == (1, 0, 0)
    other = srv.http.post("/v1/judge/compare", json={**body((Q, "Rome.", "Paris.")), "idempotency_key": "body-key"})
    assert other.status_code == 409 and other.json()["error"]["param"] == "idempotency_key"
    # a judgment that failed is not kept: the retry runs it again (and fails again, the same way)
    bad = body((Q, "x", "word " * 2100), errors="raise")
    m0 = metrics(srv)
    for _ in range(2):
        r = srv.http.post("/v1/judge/compare", json=bad, headers={"Idempotency-Key": "bad-1"})
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert delta(metrics(srv), m0)["started"] == 2
    r = srv.http.post("/v1/judge/compare", json={**b, "idempotency_key": " "})
    assert r.status_code == 400 and r.json()["error"]["param"] == "idempotency_key"


def test_a_judgment_nobody_comes_back_for_is_cancelled_after_the_grace(srv, monkeypatch):
    grace = 0.5  # well inside the judgment (8 votes of 400 tokens: seconds even on a quiet machine)
    monkeypatch.setattr(srv.judgments, "grace", grace)
    b = body((Q, "Madrid.", "Paris."), votes=8)
    m0 = metrics(srv)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/judge/compare", json=b, headers={"Idempotency-Key": "gone-1"},
                   timeout=httpx.Timeout(60, read=0.3))
    t0 = time.monotonic()
    assert wait_for(lambda: metrics(srv)["running"] == 1, 1.0)  # still running right after its client went
    assert wait_for(lambda: metrics(srv)["abandoned"] - m0["abandoned"] == 1, grace + 20)
    assert time.monotonic() - t0 >= grace - 0.3  # not before the grace period (the drop is seen within 0.2 s)
    assert wait_for(lambda: metrics(srv)["queue"] == 0)
    settled = metrics(srv)["generated"]
    time.sleep(0.3)
    assert metrics(srv)["generated"] == settled  # aborted: nothing still generating
    assert settled - m0["generated"] < 8 * 400  # stopped early, not run to the end
    assert metrics(srv)["running"] == 0 and not srv.llm.has_unfinished()
    m1 = metrics(srv)  # the key is free again: the same request starts a new judgment
    assert srv.http.post("/v1/judge/compare", json=b, headers={"Idempotency-Key": "gone-1"}).status_code == 200
    assert delta(metrics(srv), m1)["started"] == 1


# ---- OpenRLHF ---------------------------------------------------------------------------------------------
async def openrlhf_post(url: str, data: dict, total: float, try_max_times: int = 5) -> dict:
    """OpenRLHF 0.11.2's _post_request (agent.py): a fresh session per try, raise_for_status, any client
    error logged and retried after 1 s, RuntimeError after the last try."""
    for _ in range(try_max_times):
        try:
            async with httpx.AsyncClient(timeout=total) as session:
                response = await session.post(url, json=data)
                response.raise_for_status()
                return response.json()
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1)
    raise RuntimeError(f"Request error for {try_max_times} times, returning None. Please check the API server.")


def test_openrlhf_retries_join_the_judgment_by_the_body_hash(srv):
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    payload = {"query": [prompt + "Paris.<|im_end|>"], "prompts": [prompt], "labels": ["Berlin."]}
    m0 = metrics(srv)
    t0 = time.monotonic()
    # tries of 0.3 s against a judgment of ~1 s (longer on a busy machine): the first try gives up
    out = asyncio.run(openrlhf_post(f"{srv.url}/get_reward", payload, total=0.3, try_max_times=40))
    took = time.monotonic() - t0
    d = delta(metrics(srv), m0)
    assert took > 0.3 and d["started"] == 1 and d["joined"] + d["replayed"] >= 1  # at least one try gave up
    want = srv.judge.compare_batch([(prompt, "Paris.", "Berlin.")])[0]  # in process: one judgment's engine work
    alone = delta(metrics(srv), m0)
    assert alone["requests"] - d["requests"] == d["requests"]
    assert out["rewards"] == out["scores"] == [pytest.approx(want.p_first, abs=1e-5)]
    assert out["extra_logs"]["rrm_invalid"] == [0.0]


def test_openrlhf_labels_of_any_json_type(srv):
    """OpenRLHF sends the dataset's label column as it is: numbers, objects, arrays, booleans are the
    reference answer as JSON text; null and "" are no label (a lone response: invalid, flagged)."""
    labels = [42, 3.5, {"answer": "Paris"}, ["Paris", "France"], True, None, ""]
    prompts = [f"Question {i}: name a number or a city.\n" for i in range(len(labels))]
    payload = {"query": [p + "Paris." for p in prompts], "prompts": prompts, "labels": labels}
    r = srv.http.post("/get_reward", json=payload)
    assert r.status_code == 200, r.text
    out = r.json()
    texts = ["42", "3.5", '{"answer": "Paris"}', '["Paris", "France"]', "true"]
    want = srv.judge.compare_batch([(p, "Paris.", t) for p, t in zip(prompts, texts)])
    assert out["rewards"][:5] == [pytest.approx(c.p_first, abs=1e-5) for c in want]
    assert out["rewards"][5:] == [0.0, 0.0] and out["extra_logs"]["rrm_invalid"] == [0.0] * 5 + [1.0, 1.0]


# ---- JudgeClient's retry rules, against a scripted server --------------------------------------------------
class Scripted(http.server.ThreadingHTTPServer):
    """Answers each POST with the next scripted (status, headers, delay); records the keys it was sent."""

    def __init__(self, script: list[tuple[int, dict, float]]):
        self.script, self.keys = list(script), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.keys.append(self.headers.get("Idempotency-Key"))
                status, headers, delay = outer.script.pop(0) if outer.script else (200, {}, 0.0)
                time.sleep(delay)
                payload = json.dumps({"rewards": [0.25], "error": {"message": f"scripted {status}"}}).encode()
                try:
                    self.send_response(status)
                    for k, v in {"content-type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def scripted():
    servers = []

    def make(*script):
        servers.append(Scripted(list(script)))
        return servers[-1]

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


def test_judge_client_retry_rules(scripted):
    s = scripted((503, {"retry-after": "0"}, 0.0), (429, {}, 0.0), (500, {}, 0.0), (502, {}, 0.0), (200, {}, 0.0))
    c = JudgeClient(s.url, retries=5, backoff=0.01)
    assert c.openrlhf_rewards(["q"], ["q"], [1])["rewards"] == [0.25] and c.attempts == 5
    assert len(set(s.keys)) == 1 and s.keys[0]  # every retry carried the judgment's key
    s = scripted((503, {}, 0.0), (200, {}, 0.0))
    JudgeClient(s.url, backoff=0.01).openrlhf_rewards(["q"], ["q"], idempotency_key="mine")
    assert s.keys == ["mine", "mine"]
    s = scripted((400, {}, 0.0))  # refused: retrying would be refused again
    with pytest.raises(ValueError, match="400"):
        JudgeClient(s.url, backoff=0.01).openrlhf_rewards(["q"], ["q"])
    assert len(s.keys) == 1
    s = scripted((503, {}, 0.0), (503, {}, 0.0), (503, {}, 0.0))
    c = JudgeClient(s.url, retries=2, backoff=0.01)
    with pytest.raises(RuntimeError, match="503"):
        c.openrlhf_rewards(["q"], ["q"])
    assert c.attempts == 3
    # unkeyed (completions): a 500 may have come after the work ran, so it is not retried; a 503 is
    s = scripted((500, {}, 0.0), (200, {}, 0.0))
    with pytest.raises(RuntimeError):
        JudgeClient(s.url, backoff=0.01).completions(prompt="x")
    assert s.keys == [None]
    s = scripted((503, {}, 0.0), (200, {}, 0.0))
    assert JudgeClient(s.url, backoff=0.01).completions(prompt="x")["rewards"] == [0.25] and len(s.keys) == 2


def test_judge_client_deadline_and_refused_connections(scripted):
    s = scripted(*[(200, {}, 2.0)] * 5)  # every answer comes after 2 s
    c = JudgeClient(s.url, retries=5, backoff=0.01, deadline=0.8)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="deadline"):
        asyncio.run(c.acompare_batch([("q", "a", "b")]))
    assert time.monotonic() - t0 < 1.8
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    c = JudgeClient(dead, retries=2, backoff=0.01)
    with pytest.raises(httpx.ConnectError):
        c.compare_batch([("q", "a", "b")])
    assert c.attempts == 3
    with pytest.raises(ValueError, match="retries"):
        JudgeClient(dead, retries=-1)
