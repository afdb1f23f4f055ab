"""The verl adapter, called exactly as verl 0.9.1 calls a custom reward function (verl itself does not
install here without replacing this environment's transformers, so its calling code is reproduced
from its source, the verl-0.9.1 wheel on PyPI):

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
  verl/experimental/reward_loop/reward_manager/limited.py   RateLimitedRewardManager.run_single:
                                     asyncio.wait_for(compute_score, reward.timeout = 300); a timeout
                                     gives reward_extra_info {"timeout": True, "acc": 0.0}, any
                                     Exception {"error": str(e), "acc": 0.0}, a dict result its keys
  verl/experimental/reward_loop/reward_loop.py   RewardLoopManager.compute_rm_score: the columns are
                                     the first item's keys; info[key] for every item (KeyError if one
                                     item has other keys)
  verl/workers/reward_manager/batch.py   compute_score(data_sources=, solution_strs=, ground_truths=,
                                     extra_infos=, **reward_kwargs)
"""
from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import socket

import numpy as np
import pytest
import torch

import rrm_engine as rrm
from rrm_engine.judge import Judge, make_async_verl_compute_score, make_verl_compute_score
from rrm_engine.judge.prompt import PromptBuilder
from rrm_engine.judge.verl_reward import VerlConfigError
from scripted_model import write_scripted_qwen2
from test_judge_engine import wait_idle

JUDGE_KW = dict(votes=1, max_tokens=3, temperature=0.6, seed=0)
Q = "What is the capital of France?"
ITEMS = [  # (solution_str, ground_truth, extra_info as the naive manager passes it)
    ("Paris.", "Berlin.", {"question": Q}),
    ("Berlin.", "Paris.", {"question": Q, "split": "train"}),
    ("7", "8", {"question": "Name a prime.", "index": 3}),
    ("Lyon.", "Paris.", {"question": Q}),
    ("9", "2", {"question": "Name a prime."}),
    ("Paris!", "paris", {"question": Q}),
]
KEYS = {"score", "rrm_invalid", "rrm_votes", "rrm_forced", "rrm_invalid_votes", "rrm_error"}
MATH_INFO = {"split": "train", "index": 0}  # what verl's MATH / HH-RLHF preprocessors store: no question


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


async def rate_limited_run_single(compute_score, solution_str, ground_truth, extra_info, timeout=300.0):
    """RateLimitedRewardManager.run_single (limited.py), its reward paths as verl 0.9.1 writes them."""
    loop = asyncio.get_running_loop()
    call = dict(data_source="rrm", solution_str=solution_str, ground_truth=ground_truth, extra_info=dict(extra_info))
    reward_extra_info = {}
    try:
        if inspect.iscoroutinefunction(compute_score):
            work = compute_score(**call)
        else:
            work = loop.run_in_executor(None, lambda: compute_score(**call))
        result = await asyncio.wait_for(work, timeout=timeout)
        if isinstance(result, dict):
            reward = result["score"]
            reward_extra_info.update(result)
        else:
            reward = result
            reward_extra_info["acc"] = result
    except asyncio.TimeoutError:
        reward = 0.0
        reward_extra_info["timeout"] = True
        reward_extra_info["acc"] = 0.0
    except Exception as e:
        logging.getLogger(__name__).error(f"Reward computation failed: {e}")
        reward = 0.0
        reward_extra_info["error"] = str(e)
        reward_extra_info["acc"] = 0.0
    return {"reward_score": reward, "reward_extra_info": reward_extra_info}


def compute_rm_score_columns(outputs_flat):
    """RewardLoopManager.compute_rm_score (reward_loop.py): the columns of reward_extra_info."""
    infos = [o.get("reward_extra_info", {}) for o in outputs_flat]
    keys = list(infos[0].keys())
    return {key: np.array([info[key] for info in infos]) for key in keys}


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_qwen2_dir, smollm2_tokenizer):
    judge = Judge(rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=8192), **JUDGE_KW)
    want = []
    for sol, gt, info in ITEMS:  # one at a time: what each item scores alone
        want.append(judge.compare(info["question"], sol, gt).p_first)
    yield judge, want
    judge.engine.shutdown()


def reward_kwargs(model) -> dict:
    return {"rrm_model": str(model), "rrm_judge_kwargs": {**JUDGE_KW, "device": "cpu", "kv_cache_tokens": 8192}}


def check(results, want, invalid_score=0.0):
    for r, w in zip(results, want):
        assert set(r["reward_extra_info"]) == KEYS  # the same columns for every item
        if w is None:
            assert r["reward_score"] == invalid_score and r["reward_extra_info"]["rrm_invalid"] is True
            assert r["reward_extra_info"]["rrm_error"]
        else:
            assert r["reward_score"] == pytest.approx(w, abs=1e-5) and r["reward_extra_info"]["rrm_invalid"] is False
            assert r["reward_extra_info"]["rrm_error"] == ""


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
    scores invalid_score; with a missing ground truth too."""
    tok = smollm2_tokenizer
    last = PromptBuilder(tok).build(Q, "a", "b").token_ids[-1]
    write_scripted_qwen2(tmp_path, tok, [[last, *tok("\\boxed{both}", add_special_tokens=False)["input_ids"], 2]])
    judge0 = Judge(rrm.LLM(str(tmp_path), device="cpu", dtype=torch.float32, kv_cache_tokens=4096), votes=3,
                   max_tokens=12)
    score = make_verl_compute_score(judge0, invalid_score=-1.0)
    for kwargs in ({"extra_info": {"question": Q}}, {"extra_info": {"question": Q}, "foo": 1}):
        r = score(data_source="d", solution_str="Paris.", ground_truth="Berlin.", **kwargs)
        assert r["score"] == -1.0 and r["rrm_invalid"] is True
    assert score(data_source="d", solution_str="Paris.", ground_truth="Berlin.",
                 extra_info={"question": Q}) == {"score": -1.0, "rrm_invalid": True, "rrm_votes": 3, "rrm_forced": 0,
                                                 "rrm_invalid_votes": 3, "rrm_error": "no vote with a verdict"}
    missing = score.batch(["d"], ["Paris."], [None], [{"question": Q}])[0]
    assert missing["rrm_invalid"] is True and missing["rrm_error"] == "no ground_truth" and set(missing) == KEYS
    with pytest.raises(ValueError, match="invalid_score"):
        make_verl_compute_score(judge0, invalid_score=None)
    judge0.engine.shutdown()


# ---- no query: verl's own MATH / HH-RLHF datasets ----------------------------------------------------
@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
def test_an_item_without_a_query_stops_the_run_under_both_managers(tiny_qwen2_dir, name):
    """extra_info as verl's MATH preprocessor writes it (split, index): not a silent 0.0 for every item
    but an error naming the key and the options, under the naive manager and through the rate_limited
    manager's `except Exception` (which would have made it a 0.0 reward)."""
    fn = get_custom_reward_fn("pkg://rrm_engine.serving.verl", name, reward_kwargs(tiny_qwen2_dir))
    with pytest.raises(VerlConfigError) as naive:
        asyncio.run(compute_score_batch(fn, [("Paris.", "Berlin.", MATH_INFO), ITEMS[0]]))
    with pytest.raises(VerlConfigError) as limited:
        asyncio.run(rate_limited_run_single(fn, "Paris.", "Berlin.", MATH_INFO))
    for e in (naive.value, limited.value):
        msg = str(e)
        assert "extra_info['question']" in msg and "'index'" in msg and "'split'" in msg  # the keys it has
        assert "rrm_query_key" in msg and "rrm_default_query" in msg and "rrm_missing_query" in msg
    # the reproduction does swallow an ordinary exception (so the check above can fail)
    def raises(**kw):
        raise ValueError("no query")
    assert asyncio.run(rate_limited_run_single(raises, "a", "b", {}))["reward_extra_info"] == {"error": "no query",
                                                                                               "acc": 0.0}


def test_query_options_for_datasets_without_the_question(reference, tiny_qwen2_dir):
    judge, want = reference
    kw = reward_kwargs(tiny_qwen2_dir)
    by_key = get_custom_reward_fn("pkg://rrm_engine.serving.verl", "compute_score_async",
                                  {**kw, "rrm_query_key": "problem"})
    items = [(s, g, {"problem": e["question"], "split": "train"}) for s, g, e in ITEMS]
    check(asyncio.run(compute_score_batch(by_key, items)), want)
    fixed = get_custom_reward_fn("pkg://rrm_engine.serving.verl", "compute_score_async",
                                 {**kw, "rrm_default_query": Q})
    q_items = [it for it in ITEMS if it[2]["question"] == Q]
    check(asyncio.run(compute_score_batch(fixed, [(s, g, MATH_INFO) for s, g, _ in q_items])),
          [w for it, w in zip(ITEMS, want) if it[2]["question"] == Q])
    flagged = get_custom_reward_fn("pkg://rrm_engine.serving.verl", "compute_score",
                                   {**kw, "rrm_missing_query": "invalid", "rrm_invalid_score": -0.5})
    out = asyncio.run(compute_score_batch(flagged, [("Paris.", "Berlin.", MATH_INFO), ITEMS[0]]))
    check(out, [None, want[0]], invalid_score=-0.5)
    assert "extra_info['question']" in out[0]["reward_extra_info"]["rrm_error"]
    with pytest.raises(ValueError, match="missing_query"):
        make_verl_compute_score(judge, missing_query="zero")
    with pytest.raises(ValueError, match="below deadline"):
        make_verl_compute_score(judge, timeout=300, deadline=280)


# ---- the rate_limited manager: one set of keys on every path -------------------------------------------
def test_rate_limited_manager_gets_the_same_keys_on_every_path(reference, tiny_qwen2_dir):
    """Scored items, a judge that cannot be reached (after the client's retries), and a judgment past
    the deadline, as three reward workers would return them: verl's compute_rm_score builds its
    columns without a KeyError, and every invalid item says why."""
    from rrm_engine.serving import JudgeClient

    judge, want = reference
    scored = get_custom_reward_fn("pkg://rrm_engine.serving.verl", "compute_score_async", reward_kwargs(tiny_qwen2_dir))
    unreachable = make_async_verl_compute_score(JudgeClient(dead_url(), retries=2, backoff=0.01))
    late = make_verl_compute_score(judge, timeout=None, deadline=0.001)

    async def worker(fn, items):
        return await asyncio.gather(*(rate_limited_run_single(fn, s, g, e) for s, g, e in items))

    outputs = []
    for fn, items in ((scored, ITEMS[:3]), (unreachable, ITEMS[:2]), (late, [("a " * 50, "b", {"question": Q})])):
        outputs += asyncio.run(worker(fn, items))
    columns = compute_rm_score_columns(outputs)
    assert set(columns) == KEYS and all(len(v) == 6 for v in columns.values())
    check(outputs, want[:3] + [None, None, None])
    assert all(e.startswith("ConnectError") for e in columns["rrm_error"][3:5])
    assert columns["rrm_error"][5].startswith("deadline")
    wait_idle(judge.llm)  # the late judgment was aborted in the engine
    # verl's own timeout path gives other keys: the reproduction fails on them (why the deadline is ours)
    with pytest.raises(KeyError):
        compute_rm_score_columns(outputs + [{"reward_score": 0.0, "reward_extra_info": {"timeout": True, "acc": 0.0}}])
