"""The API key of `serve` on a real server (uvicorn on 127.0.0.1, tiny random Qwen2): what needs it,
the headers OpenAI/vLLM clients and URL-only clients send, JudgeClient and the verl entry points
carrying it, and serve refusing to listen beyond loopback without one."""
from __future__ import annotations

import argparse
import base64
from types import SimpleNamespace

import pytest
import torch
from live_server import live_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import rrm_engine as rrm  # noqa: E402
from rrm_engine.judge import Judge  # noqa: E402
from rrm_engine.serving import JudgeClient  # noqa: E402
from rrm_engine.serving.server import build_app  # noqa: E402

KEY = "k3y-for-tests"
Q = "What is the capital of France?"


@pytest.fixture(scope="module")
def srv(tiny_qwen2_dir, smollm2_tokenizer):
    llm = rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=4096)
    judge = Judge(llm, votes=1, max_tokens=4, temperature=0.6, seed=3)
    with live_server(build_app(judge, "tiny", api_key=KEY)) as url:
        yield SimpleNamespace(url=url, judge=judge)
    judge.engine.shutdown()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("header, status", [
    (None, 401),
    ("Bearer wrong", 401),
    (f"Bearer {KEY}x", 401),
    (f"Bearer {KEY[:-1]}", 401),
    (KEY, 401),  # no scheme
    (f"Token {KEY}", 401),
    (basic("rrm", "wrong"), 401),
    ("Basic !!!not-base64", 401),
    (f"Bearer {KEY}", 200),
    (f"bearer {KEY}", 200),  # the scheme is case-insensitive (RFC 7235)
    (basic("anyone", KEY), 200),  # what requests sends for http://anyone:<key>@host/
])
def test_every_route_but_health_needs_the_key(srv, header, status):
    headers = {} if header is None else {"Authorization": header}
    for method, path, body in [("GET", "/v1/models", None), ("GET", "/metrics", None),
                               ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                               ("POST", "/v1/judge/compare", {"items": [[Q, "Paris.", "Berlin."]]}),
                               ("POST", "/get_reward", {"query": ["q a"], "prompts": ["q "], "labels": ["b"]})]:
        r = httpx.request(method, srv.url + path, json=body, headers=headers, timeout=60)
        assert r.status_code == status, (path, header, r.text)
        if status == 401:
            assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(srv.url + "/health", headers=headers).json() == {"status": "ok"}  # open to probes


def test_a_refused_request_is_not_read(srv):
    """Without the key a large body is refused from its headers, before the server reads or parses it."""
    r = httpx.post(srv.url + "/v1/completions", content=b"{" * 1000, headers={"content-type": "application/json"})
    assert r.status_code == 401  # not the 400 the malformed body would get once read


def test_judge_client_and_verl_carry_the_key(srv, monkeypatch):
    from rrm_engine.judge.verl_reward import VerlConfigError
    from rrm_engine.serving import verl

    want = srv.judge.compare(Q, "Paris.", "Berlin.")
    with pytest.raises(ValueError, match="401"):
        JudgeClient(srv.url, api_key="wrong").compare(Q, "Paris.", "Berlin.")
    client = JudgeClient(srv.url, api_key=KEY)
    assert client.compare(Q, "Paris.", "Berlin.").p_first == pytest.approx(want.p_first, abs=1e-5)
    assert client.health() == {"status": "ok"} and client.models()["data"][0]["id"] == "tiny"
    client.close()
    monkeypatch.setenv("RRM_API_KEY", KEY)  # the default of JudgeClient, hence of the verl entry points
    assert JudgeClient(srv.url).compare(Q, "Paris.", "Berlin.").winner == want.winner
    monkeypatch.delenv("RRM_API_KEY")
    s = verl.compute_score(data_source="d", solution_str="Paris.", ground_truth="Berlin.", extra_info={"question": Q},
                           rrm_url=srv.url, rrm_api_key=KEY)
    assert s["score"] == pytest.approx(want.p_first, abs=1e-5) and s["rrm_invalid"] == 0
    with pytest.raises(VerlConfigError, match="401"):  # refused (4xx): stops the run, never a 0.0 reward
        verl.compute_score(data_source="d", solution_str="Paris.", ground_truth="Berlin.",
                           extra_info={"question": Q}, rrm_url=srv.url, rrm_api_key="wrong")


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"host": "127.0.0.1", "api_key": None, "allow_unauthenticated": False, **kw})


def test_serve_refuses_to_listen_beyond_loopback_without_a_key(monkeypatch, tiny_qwen2_dir, capsys):
    from rrm_engine.cli.main import main
    from rrm_engine.cli.serve import api_key_of

    monkeypatch.delenv("RRM_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "judge-host"):
        with pytest.raises(ValueError, match="--allow-unauthenticated"):
            api_key_of(args(host=host))
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert api_key_of(args(host=host)) is None
    assert api_key_of(args(host="0.0.0.0", allow_unauthenticated=True)) is None
    assert api_key_of(args(host="0.0.0.0", api_key="abc")) == "abc"
    monkeypatch.setenv("RRM_API_KEY", "from-env")
    assert api_key_of(args(host="0.0.0.0")) == "from-env"
    assert api_key_of(args(host="0.0.0.0", api_key="flag-wins")) == "flag-wins"
    with pytest.raises(ValueError, match="empty"):
        api_key_of(args(api_key=" "))
    # the command itself: refused before the model loads, as a usage error
    monkeypatch.delenv("RRM_API_KEY")
    assert main(["serve", "--model", str(tiny_qwen2_dir), "--host", "0.0.0.0", "--device", "cpu"]) == 2
    assert "--allow-unauthenticated" in capsys.readouterr().err


def test_openrlhf_style_client_with_the_key_in_the_url(srv):
    """OpenRLHF posts with `requests` and no Authorization header of its own (openrlhf/utils/
    remote_rm_utils.py, request_api_wrapper); the key in the URL's user info reaches the server as
    Basic auth."""
    requests = pytest.importorskip("requests")
    host = srv.url.removeprefix("http://")
    body = {"query": [f"{Q} Paris."], "prompts": [f"{Q} "], "labels": ["Berlin."]}
    ok = requests.post(url=f"http://rrm:{KEY}@{host}/get_reward", json=body,
                       headers={"Content-Type": "application/json"}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["rewards"]) == 1
    assert requests.post(url=f"http://{host}/get_reward", json=body, timeout=60).status_code == 401
    assert requests.post(url=f"http://rrm:nope@{host}/get_reward", json=body, timeout=60).status_code == 401
