"""The HTTP server on a loopback port (uvicorn in a thread, tiny random Qwen2 with the SmolLM2
tokenizer), driven by a real HTTP client: OpenAI routes against the engine's own outputs, SSE streams
against the plain answers, judge routes and OpenRLHF's reward shape against the in-process Judge,
bad bodies, and a client that goes away. One test starts `python -m rrm_engine serve` itself."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from approx_results import approx_fields

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

import rrm_engine as rrm  # noqa: E402
from rrm_engine.judge import Judge  # noqa: E402
from rrm_engine.judge.results import comparison_from_dict, ranking_from_dict  # noqa: E402
from rrm_engine.judge.rewards import ranking_rewards  # noqa: E402
from rrm_engine.serving.server import build_app  # noqa: E402
from live_server import free_port, live_server, serve_process  # noqa: E402

Q = "What is the capital of France?"
PAIRS = [(Q, "Paris.", "Berlin."), ("Name a prime.", "7", "8"), (Q, "Lyon.", "Paris, of course.")]


@pytest.fixture(scope="module")
def srv(tiny_qwen2_dir, smollm2_tokenizer):
    llm = rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=16384)
    judge = Judge(llm, votes=2, max_tokens=4, temperature=0.6, seed=3)
    with live_server(build_app(judge, "tiny")) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(url=url, http=client, llm=llm, judge=judge, tok=llm.tokenizer)
    judge.engine.shutdown()


def plain(x):
    """A judge result as plain data, floats within the noise of batching (p_first comes from log-probs)."""
    return approx_fields(x, 1e-5)


def engine_out(srv, ids, **params):
    return srv.judge.engine.submit(ids, rrm.SamplingParams(**params)).result(timeout=60)


def metric(srv, name: str) -> float:
    for line in srv.http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def sse(response) -> list:
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_health_models_metrics(srv):
    assert srv.http.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in srv.http.get("/v1/models").json()["data"]] == ["tiny"]
    before = metric(srv, "rrm_generated_tokens_total")
    r = srv.http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "ignore_eos": True, "n": 2}).json()
    assert r["usage"]["completion_tokens"] == 10
    text = srv.http.get("/metrics").text
    for name in ("rrm_prompt_tokens_total", "rrm_prefill_tokens_total", "rrm_cached_prefix_tokens_total",
                 "rrm_queue_depth", "rrm_kv_blocks_used", "rrm_kv_use_ratio", 'rrm_judge_votes_total{kind="forced"}'):
        assert name in text
    assert "# TYPE rrm_generated_tokens_total counter" in text
    assert metric(srv, "rrm_generated_tokens_total") - before == 10


def test_completions_equal_the_engine(srv):
    body = {"prompt": "The capital of France is", "max_tokens": 6, "n": 3, "temperature": 0.8, "seed": 7, "logprobs": 2}
    r = srv.http.post("/v1/completions", json=body).json()
    ids = srv.tok("The capital of France is")["input_ids"]
    want = engine_out(srv, ids, n=3, temperature=0.8, seed=7, max_tokens=6, logprobs=2)
    assert r["object"] == "text_completion" and [c["index"] for c in r["choices"]] == [0, 1, 2]
    for c, w in zip(r["choices"], want.outputs):
        assert c["text"] == w.text and c["finish_reason"] == w.finish_reason
        lp = c["logprobs"]
        assert lp["token_logprobs"] == pytest.approx([d[t] for t, d in zip(w.token_ids, w.logprobs)], abs=1e-5)
        assert all(2 <= len(top) <= 3 for top in lp["top_logprobs"])  # top 2, plus the sampled token if not among them
        assert "".join(lp["tokens"]) == srv.tok.decode(w.token_ids)
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": sum(len(w.token_ids) for w in want.outputs),
                          "total_tokens": len(ids) + sum(len(w.token_ids) for w in want.outputs)}
    # several prompts (text and token ids) x n: choice index = prompt * n + sample
    r = srv.http.post("/v1/completions", json={"prompt": [[1, 2, 3], [4, 5]], "n": 2, "max_tokens": 3,
                                                "temperature": 0}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    greedy = engine_out(srv, [4, 5], temperature=0, max_tokens=3)
    assert r["choices"][2]["text"] == r["choices"][3]["text"] == greedy.outputs[0].text


def test_chat_equals_the_engine(srv):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}]
    r = srv.http.post("/v1/chat/completions", json={"messages": msgs, "n": 2, "max_tokens": 5, "seed": 1,
                                                     "logprobs": True, "top_logprobs": 2}).json()
    text = srv.tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
                                       add_generation_prompt=True, tokenize=False)
    ids = srv.tok(text, add_special_tokens=False)["input_ids"]
    want = engine_out(srv, ids, n=2, seed=1, max_tokens=5, logprobs=2)
    assert r["object"] == "chat.completion"
    for c, w in zip(r["choices"], want.outputs):
        assert c["message"] == {"role": "assistant", "content": w.text}
        content = c["logprobs"]["content"]
        assert len(content) == len(w.token_ids) and all(len(t["top_logprobs"]) == 2 for t in content)
        assert [t["logprob"] for t in content] == pytest.approx([d[t] for t, d in zip(w.token_ids, w.logprobs)], abs=1e-5)


def test_streams_add_up_to_the_plain_answers(srv):
    body = {"prompt": "Once upon a time", "max_tokens": 8, "n": 2, "seed": 5, "logprobs": 1}
    plain = srv.http.post("/v1/completions", json=body).json()
    chunks = sse(srv.http.post("/v1/completions", json={**body, "stream": True}))
    for c in plain["choices"]:
        mine = [ch["choices"][0] for ch in chunks if ch["choices"][0]["index"] == c["index"]]
        assert "".join(x["text"] for x in mine) == c["text"]
        assert mine[-1]["finish_reason"] == c["finish_reason"] and all(x["finish_reason"] is None for x in mine[:-1])
        assert sum(len(x["logprobs"]["tokens"]) for x in mine) == len(c["logprobs"]["tokens"])
    chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "seed": 2}
    plain = srv.http.post("/v1/chat/completions", json=chat).json()["choices"][0]
    chunks = sse(srv.http.post("/v1/chat/completions", json={**chat, "stream": True}))
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert deltas[0]["role"] == "assistant" and "".join(d.get("content", "") for d in deltas) == plain["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"max_tokens": 5}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "word " * 2100}, "prompt"),  # longer than the context (2048)
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": [[1, 2], [10 ** 9]]}, "prompt"),  # a token id outside the vocabulary
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/judge/compare", {"items": [{"query": Q, "a": "x", "b": 5}]}, "items.0"),
    ("/v1/judge/compare", {"items": [{"query": Q, "a": "x"}]}, "items.0"),
    ("/v1/judge/compare", {"items": [["", "x", "y"]]}, "items.0"),
    ("/v1/judge/compare", {"items": [[Q, "x", "word " * 2100]]}, "items.0"),  # oversized judge prompt
    ("/v1/judge/compare", {"items": [[Q, "x", "y"]], "votes": 0}, "votes"),
    ("/v1/judge/compare", {"itemz": []}, "items"),
    ("/v1/judge/rank", {"items": [[Q, ["only one"]]]}, "items.0"),
    ("/v1/judge/rank", {"items": [[Q, ["a", "b"]]], "method": "swiss"}, "method"),
    ("/get_reward", {"query": ["a"], "prompts": ["a", "b"]}, "prompts"),
    ("/get_reward", {"prompts": ["a"]}, "query"),
])
def test_bad_bodies_get_400_naming_the_field(srv, route, body, param):
    r = srv.http.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err


def test_oversized_judge_item_fails_alone_when_asked(srv):
    r = srv.http.post("/v1/judge/compare", json={"items": [PAIRS[0], [Q, "x", "word " * 2100]], "errors": "return"})
    res = r.json()["results"]
    assert r.status_code == 200 and res[0]["error"] is None and "context" in res[1]["error"]


def test_judge_routes_equal_the_in_process_judge(srv):
    got = srv.http.post("/v1/judge/compare", json={"items": [{"query": q, "a": a, "b": b} for q, a, b in PAIRS]}).json()
    want = srv.judge.compare_batch(PAIRS)
    assert [plain(comparison_from_dict(d)) for d in got["results"]] == [plain(c) for c in want]
    assert got["stats"]["votes"] == 6 and got["stats"]["forced"] + got["stats"]["valid"] + got["stats"]["invalid"] == 6
    cands = ["Paris.", "Berlin.", "Lyon.", "Rome."]
    got = srv.http.post("/v1/judge/rank", json={"items": [[Q, cands]], "method": "elo", "texts": False}).json()
    want = srv.judge.rank_batch([(Q, cands)], method="elo")[0]
    r = ranking_from_dict(got["results"][0])
    assert r.order == want.order and r.scores == pytest.approx(want.scores)
    assert all(v.text == "" and v.token_ids == [] for m in r.matches for v in m.comparison.votes)  # texts: false


def test_openrlhf_reward_shape(srv):
    tok = srv.tok
    prompt = tok.apply_chat_template([{"role": "user", "content": Q}], add_generation_prompt=True, tokenize=False)
    other = tok.apply_chat_template([{"role": "user", "content": "Name a prime."}], add_generation_prompt=True,
                                    tokenize=False)
    answers = ["Paris.", "Berlin.", "Lyon."]
    queries = [prompt + a + "<|im_end|>" for a in answers] + [other + "7<|im_end|>", other + "9", "unrelated"]
    prompts = [prompt] * 3 + [other, other, other]
    labels = [None, None, None, "11", None, None]
    r = srv.http.post("/get_reward", json={"query": queries, "prompts": prompts, "labels": labels})
    out = r.json()
    assert r.status_code == 200 and set(out) == {"rewards", "scores", "extra_logs"} and out["rewards"] == out["scores"]
    assert len(out["rewards"]) == 6 and all(isinstance(x, float) for x in out["rewards"])
    # the three answers to `prompt` are ranked together, with the end marker stripped
    ranking = srv.judge.rank_batch([(prompt, answers)])[0]
    want = [0.0 if x is None else x for x in ranking_rewards(ranking, "knockout")]
    assert out["rewards"][:3] == pytest.approx(want)
    # a label: reference mode, P(response beats the label)
    ref = srv.judge.compare_batch([(other, "7", "11")])[0]
    assert out["rewards"][3] == pytest.approx(ref.p_first)
    # "9" is alone with its prompt (no label), "unrelated" does not start with its prompt: invalid, 0.0, flagged
    assert out["rewards"][4:] == [0.0, 0.0] and out["extra_logs"]["rrm_invalid"][4:] == [1.0, 1.0]
    assert out["extra_logs"]["rrm_invalid"][3] == 0.0


def test_client_that_disconnects_aborts_its_requests(srv):
    long = {"prompt": "Tell me everything.", "max_tokens": 1900, "n": 4, "ignore_eos": True}

    def plain_request_given_up():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/completions", json=long, timeout=httpx.Timeout(60, read=0.5))

    def stream_left_after_two_chunks():
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**long, "stream": True}, timeout=60) as r:
            got: list[str] = []
            for line in r.iter_lines():
                got += [line] if line.startswith("data: ") else []
                if len(got) == 2:
                    break
            assert len(got) == 2 and "[DONE]" not in got[-1]

    for leave in (plain_request_given_up, stream_left_after_two_chunks):
        before = metric(srv, "rrm_generated_tokens_total")
        leave()
        deadline = time.monotonic() + 20
        while metric(srv, "rrm_queue_depth") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(srv, "rrm_queue_depth") == 0
        settled = metric(srv, "rrm_generated_tokens_total")
        time.sleep(0.5)
        assert metric(srv, "rrm_generated_tokens_total") == settled  # nothing still generating
        assert settled - before < 4 * 1900  # stopped early, not run to the end
    assert not srv.llm.has_unfinished()


def test_client_sync_async_and_adapters_over_http(srv):
    import asyncio

    from rrm_engine.judge import make_trl_reward, make_verl_compute_score
    from rrm_engine.serving import JudgeClient

    client = JudgeClient(srv.url)
    want = srv.judge.compare_batch(PAIRS)
    assert [plain(c) for c in client.compare_batch(PAIRS)] == [plain(c) for c in want]
    assert [plain(c) for c in asyncio.run(client.acompare_batch(PAIRS))] == [plain(c) for c in want]
    assert client.rank(Q, ["a", "b", "c"]).order == srv.judge.rank(Q, ["a", "b", "c"]).order
    with pytest.raises(ValueError, match="400.*query is empty"):
        client.compare("", "a", "b")
    reward = make_trl_reward(client)
    assert reward(prompts=[Q, Q], completions=["Paris.", "Berlin."]) == pytest.approx(
        make_trl_reward(srv.judge)(prompts=[Q, Q], completions=["Paris.", "Berlin."]))
    s = make_verl_compute_score(client)(data_source="d", solution_str="Paris.", ground_truth="Berlin.",
                                        extra_info={"question": Q})
    assert s["score"] == pytest.approx(srv.judge.compare(Q, "Paris.", "Berlin.").p_first)
    assert client.completions(prompt="Hi", max_tokens=2)["choices"][0]["finish_reason"] in ("length", "stop")
    client.close()


def test_serve_command(tiny_qwen2_dir, smollm2_tokenizer):
    port = free_port()
    args = ["--model", str(tiny_qwen2_dir), "--device", "cpu", "--kv-cache-tokens", "4096", "--votes", "1",
            "--max-tokens", "3", "--log-level", "warning"]
    with serve_process(args, port):
        r = httpx.post(f"http://127.0.0.1:{port}/v1/judge/compare", json={"items": [list(PAIRS[0])]}, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"][0]["votes"]) == 1


def test_a_failed_engine_step_answers_500_and_the_server_goes_on(srv):
    from fault_injection import Fault

    engine = srv.llm.engine
    layer = engine.model.model.layers[0]
    fault = Fault(engine, None, at=1)
    handle = layer.register_forward_hook(fault.hook)
    try:
        r = srv.http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["type"] == "engine_step_failed" and fault.fired
        # the judge routes report a failed item instead of failing the batch
        fault.fired, fault.calls = False, 0
        out = srv.http.post("/v1/judge/compare", json={"items": [PAIRS[0]], "errors": "return"}).json()["results"]
        assert fault.fired and "step" in out[0]["error"] and out[0]["winner"] is None
    finally:
        handle.remove()
    r = srv.http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert srv.http.post("/v1/judge/compare", json={"items": [PAIRS[0]]}).json()["results"][0]["error"] is None
