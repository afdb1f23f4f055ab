"""The TRL adapter with the real TRL (1.16): a GRPOTrainer step on CPU with the judge as its reward
(sync group ranking + async reference mode, statistics through log_metric), and two processes
(torchrun, gloo) where TRL's split of a group across ranks must not split the judgment: the group is
gathered (on the caller's thread), ranked once, and each rank gets its slice of that one ranking.
The same through a server's group rendezvous, without torch.distributed: tests/test_trl_group.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rrm_engine as rrm
from rrm_engine.judge import Judge, make_async_trl_reward, make_trl_reward

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from trl_ranks import JUDGE_KW, SPLIT  # noqa: E402


@pytest.fixture(scope="module")
def judge(tiny_qwen2_dir, smollm2_tokenizer):
    j = Judge(rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=8192), **JUDGE_KW)
    yield j
    j.engine.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, mode: str, model, gather: bool, timeout: int) -> list[dict]:
    out = tmp_path / f"{mode}-{int(gather)}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
           "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "trl_ranks.py"), mode, str(model), str(out), "1" if gather else "0"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # its own process group: a timeout ends the ranks too
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    assert p.returncode == 0, log[-5000:]
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]


def test_grpo_trainer_step_with_sync_and_async_rewards(judge, tiny_qwen2_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    group = make_trl_reward(judge)
    reference = make_async_trl_reward(judge, reference_column="solution")
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=4, max_steps=1, use_cpu=True, report_to="none", logging_steps=1,
                          save_strategy="no", seed=0)
    data = Dataset.from_list([{"prompt": "What is 2+2?", "solution": "4"}, {"prompt": "Name a prime.", "solution": "7"}])
    t = trl.GRPOTrainer(model=str(tiny_qwen2_dir), reward_funcs=[group, reference], args=args, train_dataset=data)
    t.train()
    log = t.state.log_history[0]
    # one group of 4 per step, knockout: champion 1, finalist 0.5, first-round losers 0 (no verdict missing)
    assert log["rewards/rrm_knockout/mean"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert 0.0 < log["rewards/rrm_reference_async/mean"] < 1.0  # P(completion beats the reference)
    assert log["rrm_knockout/votes"] == 3 and log["rrm_reference/votes"] == 4  # 3 matches; 4 comparisons
    for name in ("rrm_knockout", "rrm_reference"):
        assert log[f"{name}/invalid_rate"] == 0.0 and log[f"{name}/forced_rate"] == 1.0  # tiny model: all forced
        assert log[f"{name}/tokens"] > 0 and log[f"{name}/seconds"] > 0 and log[f"{name}/unscored"] == 0.0


def test_reference_mode_needs_its_column(judge):
    reward = make_trl_reward(judge, reference_column="solution")
    with pytest.raises(ValueError, match="'solution'"):
        reward(prompts=["q"], completions=["a"])
    r = reward(prompts=["What is 2+2?"], completions=["4"], solution=["four"])
    assert r[0] == pytest.approx(judge.compare("What is 2+2?", "4", "four").p_first, abs=1e-5)


def test_two_ranks_rank_each_group_once(judge, tiny_qwen2_dir, tmp_path):
    """Rank 0 holds half of a group of 4, rank 1 the other half (+ a group of its own, + a group split
    1/1). Gathered, the rewards equal one process ranking the whole batch."""
    prompts = SPLIT[0][0] + SPLIT[1][0]
    completions = SPLIT[0][1] + SPLIT[1][1]
    whole = make_trl_reward(judge)(prompts=prompts, completions=completions)
    ranks = torchrun(tmp_path, "direct", tiny_qwen2_dir, gather=True, timeout=240)
    got = ranks[0]["rewards"] + ranks[1]["rewards"]
    assert got == pytest.approx(whole, abs=1e-6)
    group = [got[i] for i, p in enumerate(prompts) if p == prompts[0]]
    assert sorted(group) == [0.0, 0.0, 0.5, 1.0]  # one champion of the whole group
    # every rank logs the totals over both: 3 + 1 + 1 matches of 1 vote
    assert ranks[0]["logged"]["rrm_knockout/votes"] == ranks[1]["logged"]["rrm_knockout/votes"] == 5
    # the two collectives ran on the caller's own thread (not a worker thread: NCCL object collectives
    # from one are reported to hang), and the async form, which TRL runs on its event-loop thread, refuses
    for r in ranks:
        assert r["on_main_thread"] == [True, True]
        assert "JudgeClient" in r["async_refused"] and "event-loop thread" in r["async_refused"]
    # what the gather prevents (TRL's own behaviour for a per-process reward function): each rank's half
    # ranked alone gives two champions that were never compared, and a group split 1/1 nothing at all
    alone = make_trl_reward(judge, gather=False)
    halves = [alone(prompts=p, completions=c) for p, c in (SPLIT[0], SPLIT[1])]
    assert sorted(halves[0][:2] + halves[1][:2]) == [0.0, 0.0, 1.0, 1.0]
    assert halves[0][2] is None and halves[1][4] is None


@pytest.mark.slow
def test_two_process_grpo_trainer_step(tiny_qwen2_dir, tmp_path):
    """TRL's GRPOTrainer itself with 2 processes (2 generations of the group on each)."""
    pytest.importorskip("trl")
    ranks = torchrun(tmp_path, "trainer", tiny_qwen2_dir, gather=True, timeout=600)
    gathered = ranks[0]["rewards"][0] + ranks[1]["rewards"][0]
    assert sorted(gathered) == [0.0, 0.0, 0.5, 1.0]
    assert ranks[0]["log"]["rewards/rrm_knockout/mean"] == pytest.approx(0.375)
    assert ranks[0]["log"]["rrm_knockout/votes"] == 3
    split = torchrun(tmp_path, "trainer", tiny_qwen2_dir, gather=False, timeout=600)
    assert sorted(split[0]["rewards"][0] + split[1]["rewards"][0]) == [0.0, 0.0, 1.0, 1.0]
