"""One rank of the two-process TRL tests (started by torchrun from tests/test_trl_reward.py).

  direct MODEL OUT GATHER   the reward function called as TRL calls it, each rank holding its slice of
                            the batch (SPLIT below: a group of 4 split 2/2, a group on rank 1 only, a
                            group split 1/1); gloo process group
  trainer MODEL OUT GATHER  one step of TRL's GRPOTrainer (use_cpu) with 2 processes: one prompt, 4
                            generations, 2 per process

Each rank writes OUT.<rank> (JSON): its rewards and what the function logged through log_metric.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import rrm_engine as rrm
from rrm_engine.judge import Judge, make_trl_reward

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
    reward = make_trl_reward(judge, gather=gather)
    r = reward(prompts=prompts, completions=completions, completion_ids=None, trainer_state=None,
               log_metric=lambda k, v: logged.__setitem__(k, v))
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rewards": r, "logged": logged}, f)
    dist.barrier()
    judge.engine.shutdown()
    dist.destroy_process_group()


def trainer(model: str, out: str, gather: bool) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    seen: list[list] = []
    base = make_trl_reward(judge_for(model), gather=gather)

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


if __name__ == "__main__":
    mode, model, out, gather = sys.argv[1:5]
    torch.set_num_threads(1)
    {"direct": direct, "trainer": trainer}[mode](model, out, gather == "1")
    # results are written: leave without interpreter finalisation, where the judge's daemon loop
    # thread and gloo's threads can be torn down in an order that aborts ("terminate called ...")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
