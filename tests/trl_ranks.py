"""One rank of the two-process TRL tests (started by torchrun from tests/test_trl_reward.py, or as a
plain process from tests/test_trl_group.py).

  direct MODEL OUT GATHER   the reward function called as TRL calls it, each rank holding its slice of
                            the batch (SPLIT below: a group of 4 split 2/2, a group on rank 1 only, a
                            group split 1/1); gloo process group, in-process judge: the collectives must
                            run on the caller's thread, and the async form must refuse
  trainer MODEL OUT GATHER [URL]  one step of TRL's GRPOTrainer (use_cpu) with 2 processes: one prompt,
                            4 generations, 2 per process; with URL the reward is a JudgeClient of that
                            server (the group rendezvous), else an in-process judge
  group URL OUT STEPS WAIT  the reward function with a JudgeClient, as TRL calls it, at steps 0..STEPS-1
                            (SPLIT's slice of RANK, from the environment; no process group at all)

Each rank writes OUT.<rank> (JSON): its rewards and what the function logged through log_metric.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from types import SimpleNamespace

import torch
import torch.distributed as dist

import rrm_engine as rrm
from rrm_engine.judge import Judge, make_async_trl_reward, make_trl_reward

Q1, Q2, Q3 = "What is 2+2?", "Name a prime.", "Say hi."
SPLIT = {  # rank -> (prompts, completions)
    0: ([Q1, Q1, Q3], ["4", "four", "hi"]),
    1: ([Q1, Q1, Q2, Q2, Q3], ["5", "2+2", "7", "9", "hello"]),
}
JUDGE_KW = dict(votes=1, max_tokens=3, temperature=0.6, seed=0)


def judge_for(model: str) -> Judge:
    return Judge(rrm.LLM(model, device="cpu", dtype=torch.float32, kv_cache_tokens=8192), **JUDGE_KW)


def direct(model: str, out: str, gather: bool) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    prompts, completions = SPLIT[rank]
    logged: dict[str, float] = {}
    judge = judge_for(model)
    threads: list[bool] = []  # per collective: did it run on the caller's (main) thread?
    gather_object = dist.all_gather_object

    def recording(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return gather_object(*args, **kwargs)

    dist.all_gather_object = recording
    reward = make_trl_reward(judge, gather=gather)
    r = reward(prompts=prompts, completions=completions, completion_ids=None, trainer_state=None,
               log_metric=lambda k, v: logged.__setitem__(k, v))
    try:  # the async form would run the collective on TRL's event-loop thread: refused, before any collective
        asyncio.run(make_async_trl_reward(judge, gather=gather)(prompts=prompts, completions=completions))
        refused = None
    except RuntimeError as e:
        refused = str(e)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rewards": r, "logged": logged, "on_main_thread": threads, "async_refused": refused}, f)
    dist.barrier()
    judge.engine.shutdown()
    dist.destroy_process_group()


def trainer(model: str, out: str, gather: bool, url: str | None = None) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rrm_engine.serving import JudgeClient

    seen: list[list] = []
    base = make_trl_reward(JudgeClient(url) if url else judge_for(model), gather=gather, wait=300)

    def rrm_knockout(prompts, completions, **kwargs):
        r = base(prompts, completions, **kwargs)
        seen.append(r)
        return r

    args = GRPOConfig(output_dir=os.path.join(os.path.dirname(out), "grpo"), per_device_train_batch_size=2,
                      num_generations=4, max_completion_length=4, max_steps=1, use_cpu=True, report_to="none",
                      logging_steps=1, save_strategy="no", seed=0)
    t = GRPOTrainer(model=model, reward_funcs=[rrm_knockout], args=args,
                    train_dataset=Dataset.from_list([{"prompt": Q1}] * 2))
    t.train()
    rank = int(os.environ["RANK"])
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rewards": seen, "log": t.state.log_history[0]}, f)


def group(url: str, out: str, steps: int, wait: float) -> None:
    from rrm_engine.serving import JudgeClient

    rank = int(os.environ["RANK"])
    prompts, completions = SPLIT[rank]
    reward = make_trl_reward(JudgeClient(url, retries=0), wait=wait)
    calls: list[dict] = []
    for step in range(steps):
        logged: dict[str, float] = {}
        try:
            r = reward(prompts=prompts, completions=completions, completion_ids=None,
                       trainer_state=SimpleNamespace(global_step=step), log_metric=lambda k, v: logged.__setitem__(k, v))
            calls.append({"rewards": r, "logged": logged})
        except Exception as e:
            calls.append({"error": f"{type(e).__name__}: {e}"})
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"calls": calls, "dist_initialized": dist.is_initialized()}, f)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    if mode == "group":
        group(args[0], args[1], int(args[2]), float(args[3]))
    else:
        {"direct": direct, "trainer": trainer}[mode](args[0], args[1], args[2] == "1", *args[3:])
    # results are written: leave without interpreter finalisation, where the judge's daemon loop
    # thread and gloo's threads can be torn down in an order that aborts ("terminate called ...")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
