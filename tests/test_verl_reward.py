"""The verl adapter, called exactly as verl 0.9.1 calls a custom reward function (verl itself does not
install here without replacing this environment's transformers, so its calling code is reproduced
from its source):

  verl/trainer/ppo/reward.py         get_custom_reward_fn: load `name` from `pkg://module`, wrap it in
                                     functools.partial(_call_with_kwargs[_async], raw_fn, reward_kwargs)
                                     (config kwargs merged over the call's)
  verl/experimental/reward_loop/reward_manager/naive.py   run_single: a coroutine function is awaited,
                                     a plain one runs in loop.run_in_executor(None, ...); keyword
                                     arguments data_source, solution_str, ground_truth, extra_info
                                     (a dict the manager adds num_turns / rollout_reward_scores to),
                                     plus reward_router_address / reward_model_tokenizer with a router;
                                     a dict result gives "score" and every key to reward_extra_info
  verl/experimental/reward_loop/reward_loop.py   compute_score_batch: asyncio.gather over the items
  verl/experimental/reward_loop/reward_manager/limited.py   asyncio.wait_for(..., timeout)
  verl/workers/reward_manager/batch.py   compute_score(data_sources=, solution_strs=, ground_truths=,
                                     extra_infos=, **reward_kwargs)
"""
from __future__ import annotations

import asyncio
import functools
import importlib
import inspect

import pytest
import torch

import rrm_engine as rrm
from rrm_engine.judge import Judge, make_async_verl_compute_score, make_verl_compute_score
from rrm_engine.judge.prompt import PromptBuilder
from scripted_model import write_scripted_qwen2
from test_judge_engine import wait_idle

JUDGE_KW = dict(votes=1, max_tokens=3, temperature=0.6, seed=0)
Q = "What is the capital of France?"
ITEMS = [  # (solution_str, ground_truth, extra_info as the naive manager passes it)
    ("Paris.", "Berlin.", {"question": Q}),
    ("Berlin.", "Paris.", {"question": Q, "split": "train"}),
    ("7", "8", {"question": "Name a prime.", "index": 3}),
    ("Lyon.", "Paris.", {"question": Q}),
    ("no query", "here", {}),  # extra_info without the question: invalid, never an exception
    ("x", "y", {"other": 1}),
    ("9", "2", {"question": "Name a prime."}),
    ("Paris!", "paris", {"question": Q}),
]
KEYS = {"score", "rrm_invalid", "rrm_votes", "rrm_forced", "rrm_invalid_votes"}


# ---- verl's calling code, reproduced -----------------------------------------------------------------
def _call_with_kwargs(raw_fn, extra_kwargs, *args, **kwargs):
    return raw_fn(*args, **{**kwargs, **extra_kwargs})


async def _call_with_kwargs_async(raw_fn, extra_kwargs, *args, **kwargs):
    return await raw_fn(*args, **{**kwargs, **extra_kwargs})


def get_custom_reward_fn(path: str, name: str, reward_kwargs: dict):
    raw_fn = getattr(importlib.import_module(path.removeprefix("pkg://").replace("/", ".")), name)
    if not inspect.iscoroutinefunction(raw_fn):
        return functools.partial(_call_with_kwargs, raw_fn, reward_kwargs)
    return functools.partial(_call_with_kwargs_async, raw_fn, reward_kwargs)


async def run_single(compute_score, solution_str, ground_truth, extra_info, router=None):
    loop = asyncio.get_running_loop()
    extra_info = dict(extra_info)
    extra_info["num_turns"] = None
    extra_info["rollout_reward_scores"] = {}
    extra = {"reward_router_address": router, "reward_model_tokenizer": object()} if router else {}
    call = dict(data_source="rrm", solution_str=solution_str, ground_truth=ground_truth, extra_info=extra_info, **extra)
    if inspect.iscoroutinefunction(compute_score):
        result = await compute_score(**call)
    else:
        result = await loop.run_in_executor(None, lambda: compute_score(**call))
    reward_extra_info = dict(result) if isinstance(result, dict) else {"acc": result}
    return {"reward_score": result["score"] if isinstance(result, dict) else result,
            "reward_extra_info": reward_extra_info}


async def compute_score_batch(compute_score, items, router=None):
    return await asyncio.gather(*(run_single(compute_score, s, g, e, router) for s, g, e in items))


# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_qwen2_dir, smollm2_tokenizer):
    judge = Judge(rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=8192), **JUDGE_KW)
    want = []
    for sol, gt, info in ITEMS:  # one at a time: what each item scores alone
        want.append(judge.compare(info["question"], sol, gt).p_first if "question" in info else None)
    yield judge, want
    judge.engine.shutdown()


def reward_kwargs(model) -> dict:
    return {"rrm_model": str(model), "rrm_judge_kwargs": {**JUDGE_KW, "device": "cpu", "kv_cache_tokens": 8192}}


def check(results, want, invalid_score=0.0):
    for r, w in zip(results, want):
        assert set(r["reward_extra_info"]) == KEYS  # the same columns for every item
        if w is None:
            assert r["reward_score"] == invalid_score and r["reward_extra_info"]["rrm_invalid"] is True
        else:
            assert r["reward_score"] == pytest.approx(w, abs=1e-5) and r["reward_extra_info"]["rrm_invalid"] is False


@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
def test_verl_reward_loop_calls_it_concurrently(reference, tiny_qwen2_dir, name):
    judge, want = reference
    fn = get_custom_reward_fn("pkg://rrm_engine.serving.verl", name, reward_kwargs(tiny_qwen2_dir))
    assert inspect.iscoroutinefunction(fn) == (name == "compute_score_async")
    # the whole batch at once, as the reward loop does; twice (a router's extra kwargs the second time)
    check(asyncio.run(compute_score_batch(fn, ITEMS)), want)
    check(asyncio.run(compute_score_batch(fn, ITEMS * 3, router="10.0.0.1:9000")), want * 3)


def test_verl_batch_manager_form(reference, tiny_qwen2_dir):
    judge, want = reference
    fn = get_custom_reward_fn("pkg://rrm_engine.serving.verl", "compute_score_batch", reward_kwargs(tiny_qwen2_dir))
    out = fn(data_sources=["rrm"] * len(ITEMS), solution_strs=[s for s, _, _ in ITEMS],
             ground_truths=[g for _, g, _ in ITEMS], extra_infos=[e for _, _, e in ITEMS])
    check([{"reward_score": r["score"], "reward_extra_info": r} for r in out], want)


def test_limited_manager_timeout_aborts(reference):
    judge, _ = reference
    fn, afn = make_verl_compute_score(judge), make_async_verl_compute_score(judge)

    async def limited():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(afn(data_source="d", solution_str="a " * 50, ground_truth="b",
                                       extra_info={"question": Q}), timeout=0.001)

    asyncio.run(limited())
    wait_idle(judge.llm)  # the cancelled judgment was aborted in the engine
    assert fn(data_source="d", solution_str="Paris.", ground_truth="Berlin.", extra_info={"question": Q})["score"] > 0


def test_an_invalid_judgment_scores_the_configured_float_never_a_win(smollm2_tokenizer, tmp_path):
    """A judge that answers \\boxed{both} (a scripted tiny model): every item is invalid, flagged, and
    scores invalid_score; with None extra_info or a missing ground truth too."""
    tok = smollm2_tokenizer
    last = PromptBuilder(tok).build(Q, "a", "b").token_ids[-1]
    write_scripted_qwen2(tmp_path, tok, [[last, *tok("\\boxed{both}", add_special_tokens=False)["input_ids"], 2]])
    judge0 = Judge(rrm.LLM(str(tmp_path), device="cpu", dtype=torch.float32, kv_cache_tokens=4096), votes=3,
                   max_tokens=12)
    score = make_verl_compute_score(judge0, invalid_score=-1.0)
    for kwargs in ({"extra_info": {"question": Q}}, {"extra_info": None}, {"extra_info": {"question": Q}, "foo": 1}):
        r = score(data_source="d", solution_str="Paris.", ground_truth="Berlin.", **kwargs)
        assert r["score"] == -1.0 and r["rrm_invalid"] is True
    assert score(data_source="d", solution_str="Paris.", ground_truth="Berlin.",
                 extra_info={"question": Q}) == {"score": -1.0, "rrm_invalid": True, "rrm_votes": 3, "rrm_forced": 0,
                                                 "rrm_invalid_votes": 3}
    assert score.batch(["d"], ["Paris."], [None], [{"question": Q}])[0]["rrm_invalid"] is True
    with pytest.raises(ValueError, match="invalid_score"):
        make_verl_compute_score(judge0, invalid_score=None)
    judge0.engine.shutdown()
