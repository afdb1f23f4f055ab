"""TRL group mode through a real server's group rendezvous (POST /v1/judge/group, serving/groups.py),
with no torch.distributed at all: two trainer processes (plain processes with RANK / WORLD_SIZE, as
torchrun sets them, and no process group), each holding half of a group, call the TRL reward function
with a JudgeClient of a server on 127.0.0.1. Both get their part of one ranking of the whole group,
the same rewards one process ranking the whole batch gets; the server ranks each batch once; a rank
that never posts makes the other fail with a timeout naming it; a retried slice joins, a conflicting
one is refused."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

import rrm_engine as rrm  # noqa: E402
from rrm_engine.judge import Judge, make_trl_reward  # noqa: E402
from rrm_engine.serving import JudgeClient  # noqa: E402
from rrm_engine.serving.server import build_app  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from live_server import live_server  # noqa: E402
from trl_ranks import JUDGE_KW, SPLIT  # noqa: E402


@pytest.fixture(scope="module")
def judge(tiny_qwen2_dir, smollm2_tokenizer):
    j = Judge(rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=8192), **JUDGE_KW)
    yield j
    j.engine.shutdown()


@pytest.fixture()
def url(judge):
    with live_server(build_app(judge, "tiny")) as u:  # a fresh app each test: fresh group counters
        yield u


def counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r"^rrm_groups_(\w+?)(?:_total)? (\S+)$", text, re.M)}


def ranks(tmp_path: Path, url: str, which: tuple[int, ...], steps: int, wait: float, world: int = 2,
          timeout: int = 180) -> dict[int, dict]:
    """Run trl_ranks.py `group` as one plain process per rank in `which` (world size `world`)."""
    out = tmp_path / "group"
    procs = {}
    for rank in which:
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "RRM_RUN_ID": tmp_path.name,
               "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
        procs[rank] = subprocess.Popen([sys.executable, str(HERE / "trl_ranks.py"), "group", url, str(out), str(steps),
                                        str(wait)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, start_new_session=True)
    try:
        for rank, p in procs.items():
            log, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, log[-5000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return {rank: json.loads(Path(f"{out}.{rank}").read_text()) for rank in which}


def test_two_processes_get_their_parts_of_one_ranking(judge, url, tmp_path):
    prompts = SPLIT[0][0] + SPLIT[1][0]
    completions = SPLIT[0][1] + SPLIT[1][1]
    whole = make_trl_reward(judge)(prompts=prompts, completions=completions)  # one process, the whole batch
    got = ranks(tmp_path, url, (0, 1), steps=2, wait=120)
    assert not got[0]["dist_initialized"] and not got[1]["dist_initialized"]  # no collective of any kind
    for step in range(2):
        calls = [got[r]["calls"][step] for r in (0, 1)]
        assert all("error" not in c for c in calls), calls
        rewards = calls[0]["rewards"] + calls[1]["rewards"]
        assert rewards == pytest.approx(whole, abs=1e-6)
        group = [rewards[i] for i, p in enumerate(prompts) if p == prompts[0]]
        assert sorted(group) == [0.0, 0.0, 0.5, 1.0]  # one champion of the group split 2/2
        assert sorted([rewards[2], rewards[7]]) == [0.0, 1.0]  # the group split 1/1 is ranked too
        # both log the totals of the whole batch: 3 + 1 + 1 matches of 1 vote
        assert calls[0]["logged"]["rrm_knockout/votes"] == calls[1]["logged"]["rrm_knockout/votes"] == 5
    c = counters(url)
    assert c["ranked"] == 2 and c["slices"] == 4 and c["joined"] == 0 and c["timeouts"] == 0  # once per step


def test_a_rank_that_never_posts_is_named(url, tmp_path):
    got = ranks(tmp_path, url, (0,), steps=1, wait=2)
    err = got[0]["calls"][0]["error"]
    assert err.startswith("TimeoutError") and "rank(s) [1] of 2 never posted" in err and "within 2 s" in err
    c = counters(url)
    assert c["ranked"] == 0 and c["timeouts"] == 1 and c["open"] == 1  # its slice waits for a retry or rank 1


def test_a_retried_slice_joins_and_a_late_rank_completes_the_group(url):
    client = JudgeClient(url, retries=0)
    items = list(zip(*SPLIT[0]))
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\] of 2"):
        client.rank_group("g1", 0, 2, items, wait=0.5)
    parts: dict[int, object] = {}
    # rank 0 retries (joins: not counted again) while rank 1 arrives and completes the group
    t = threading.Thread(target=lambda: parts.__setitem__(0, client.rank_group("g1", 0, 2, items, wait=60)))
    t.start()
    time.sleep(0.3)
    parts[1] = client.rank_group("g1", 1, 2, list(zip(*SPLIT[1])), wait=60)
    t.join(60)
    again = client.rank_group("g1", 0, 2, items, wait=60)  # after the ranking: answered from the kept result
    assert again.positions == parts[0].positions and again.stats == parts[0].stats
    assert [r.order for r in again.rankings] == [r.order for r in parts[0].rankings]
    c = counters(url)
    assert c["ranked"] == 1 and c["slices"] == 2 and c["joined"] == 2 and c["timeouts"] == 1
    # rank 0 holds Q1 x2 and Q3; rank 1 Q1 x2, Q2 x2, Q3: the group of Q1 is one ranking of 4 on both sides
    assert parts[0].positions[:2] == [(0, 0), (0, 1)] and parts[1].positions[:2] == [(0, 2), (0, 3)]
    assert len(parts[0].rankings[0].scores) == 4
    assert parts[0].rankings[0].scores == parts[1].rankings[0].scores


def test_bad_slices_are_refused_naming_the_field(url):
    client = JudgeClient(url, retries=0)
    items = list(zip(*SPLIT[0]))
    with pytest.raises(TimeoutError):
        client.rank_group("g2", 0, 2, items, wait=0.2)
    with pytest.raises(ValueError, match=r"409: .*rank 0 already posted a different slice"):
        client.rank_group("g2", 0, 2, items[:1], wait=0.2)
    with pytest.raises(ValueError, match=r"400: .*world=3.*opened with world=2"):
        client.rank_group("g2", 1, 3, items, wait=0.2)
    with pytest.raises(ValueError, match=r"400: .*method='elo'.*opened with method='knockout'"):
        client.rank_group("g2", 1, 2, items, method="elo", wait=0.2)
    with pytest.raises(ValueError, match=r"400: rank must be in \[0, world=2\)"):
        client.rank_group("g3", 2, 2, items, wait=0.2)
    r = httpx.post(f"{url}/v1/judge/group", json={"group": "g4", "rank": 0, "world": 1, "items": [["q", 3]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "items.0"
    assert "completion must be a str" in r.json()["error"]["message"]


def test_one_process_needs_no_rendezvous(judge, url):
    """WORLD_SIZE unset: the client ranks the slice's groups itself (/v1/judge/rank), as one process."""
    reward = make_trl_reward(JudgeClient(url))
    r = reward(prompts=SPLIT[1][0], completions=SPLIT[1][1], trainer_state=SimpleNamespace(global_step=0))
    assert r == pytest.approx(make_trl_reward(judge)(prompts=SPLIT[1][0], completions=SPLIT[1][1]), abs=1e-6)
    assert counters(url).get("slices", 0) == 0


def test_the_group_key_is_the_same_on_every_rank_and_new_per_call(monkeypatch):
    from rrm_engine.judge.trl_reward import _TRLReward

    monkeypatch.setenv("RRM_RUN_ID", "job7")
    keys = []
    for _ in range(2):  # two processes: each its own reward function
        core = _TRLReward(object(), "knockout", None, None, None, True, None, None)
        keys.append([core._group_key({"trainer_state": SimpleNamespace(global_step=s)}) for s in (0, 0, 1)])
    assert keys[0] == keys[1] == ["job7/rrm_knockout/step0/call1", "job7/rrm_knockout/step0/call2",
                                  "job7/rrm_knockout/step1/call1"]


def test_two_process_grpo_trainer_step_through_the_server(url, tiny_qwen2_dir, tmp_path):
    """TRL's GRPOTrainer itself with 2 processes (torchrun; accelerate's gloo group exists, but the
    reward uses none of it): 2 generations of the group on each, ranked once by the server. 19-38 s on
    the 2-core CPU VM (2026-12-07), about the two-process gloo test's time, so not marked slow."""
    pytest.importorskip("trl")
    out = tmp_path / "trainer"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    with socket_port() as port:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(HERE / "trl_ranks.py"), "trainer", str(tiny_qwen2_dir), str(out), "1", url]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 0, log[-5000:]
    got = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert sorted(got[0]["rewards"][0] + got[1]["rewards"][0]) == [0.0, 0.0, 0.5, 1.0]
    assert got[0]["log"]["rewards/rrm_knockout/mean"] == pytest.approx(0.375)
    assert got[0]["log"]["rrm_knockout/votes"] == 3
    c = counters(url)
    assert c["ranked"] == 1 and c["slices"] == 2


@contextmanager
def socket_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


def test_the_rendezvous_is_bounded_and_open_groups_expire():
    """Groups alone (no server): at most max_open keys, finished ones dropped first; an incomplete
    rendezvous is dropped ttl seconds after its latest slice; a failed ranking is not kept."""
    import asyncio

    from rrm_engine.serving.groups import Groups, GroupTimeout
    from rrm_engine.serving.limits import BadField, Overloaded

    async def main() -> None:
        g = Groups(max_open=2, ttl=0.3, default_wait=0.1)
        params = {"world": 2, "method": "knockout", "votes": None, "timeout": None}

        async def ranked(slices):
            return slices

        one = {**params, "world": 1}
        assert await g.join("done", 0, one, "f", ["x"], ranked) == [["x"]]  # finished, kept for retries
        with pytest.raises(GroupTimeout):
            await g.join("open", 0, params, "f", ["a"], ranked)
        assert len(g) == 2
        with pytest.raises(GroupTimeout):  # full: the finished one makes room
            await g.join("open2", 1, params, "f", ["b"], ranked)
        assert len(g) == 2
        with pytest.raises(Overloaded):  # full of open ones
            await g.join("open3", 0, params, "f", ["c"], ranked)
        with pytest.raises(BadField, match="longer than this server keeps"):
            await g.join("open", 1, params, "f", ["d"], ranked, wait=1.0)
        await asyncio.sleep(0.35)
        assert len(g) == 0  # both expired

        async def slow(slices):
            await asyncio.sleep(0.2)
            return slices

        # `wait` bounds the gathering only: a ranking longer than it is awaited to its end
        assert await g.join("slow", 0, one, "f", ["s"], slow, wait=0.05) == [["s"]]

        async def longer_than_ttl(slices):
            await asyncio.sleep(0.5)
            return slices

        # a complete group no longer expires: its ranking outlives ttl and is still run once
        first = asyncio.ensure_future(g.join("long", 0, params, "f", ["l0"], longer_than_ttl, wait=0.3))
        await asyncio.sleep(0.1)
        assert await g.join("long", 1, params, "f", ["l1"], longer_than_ttl, wait=0.3) == [["l0"], ["l1"]]
        assert await first == [["l0"], ["l1"]]
        assert g.counts["ranked"] == 3
        assert await g.join("long", 1, params, "f", ["l1"], longer_than_ttl, wait=0.3) == [["l0"], ["l1"]]

        async def failing(slices):
            raise RuntimeError("engine went away")

        with pytest.raises(RuntimeError, match="engine went away"):
            await g.join("bad", 0, one, "f", ["x"], failing)
        assert g.counts["ranked"] == 4 and "bad" not in g._open  # a failure is not kept

    asyncio.run(main())
