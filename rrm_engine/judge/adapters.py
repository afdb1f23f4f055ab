"""The judge as a reward inside other training loops: TRL GRPOTrainer, verl, and an async form.

Rewards are never invented: a completion the judge could not score (every match it played had no
valid verdict, its group failed, or a timeout hit) gets None, which TRL treats as "no reward from
this function" (NaN, ignored by its nan-aware sum) and which the caller of the verl form must handle.

TRL reward scale (GRPO normalises rewards within each group, so only the order and spacing matter):
  knockout: rounds survived / rounds, in [0, 1] (champion 1, first-round losers 0);
  elo:      (rating - 1500) / 400, i.e. log10 Bradley-Terry strength.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

from .judge import Judge, Method, Ranking


def message_text(x: Any, what: str) -> str:
    """Text of a plain string, or of TRL's conversational format (a list of {"role", "content"}):
    for a prompt, the single user turn (a system turn is allowed); for a completion, its assistant text."""
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in x):
        users = [m for m in x if m.get("role") == "user"]
        if what == "prompt":
            if len(users) != 1 or any(m.get("role") not in ("system", "user") for m in x):
                raise ValueError("multi-turn conversations are not supported by the RRM prompt "
                                 f"(the prompt has {len(x)} messages, {len(users)} from the user)")
            return str(users[0]["content"])
        return "".join(str(m["content"]) for m in x if m.get("role", "assistant") == "assistant")
    raise ValueError(f"{what} must be a str or a list of messages, got {type(x).__name__}")


def group_by_prompt(prompts: Sequence[Any]) -> dict[str, list[int]]:
    """Indices of each distinct prompt (TRL repeats a prompt num_generations times in a batch)."""
    groups: dict[str, list[int]] = {}
    for n, p in enumerate(prompts):
        groups.setdefault(message_text(p, "prompt"), []).append(n)
    return groups


def ranking_rewards(r: Ranking, method: str) -> list[float | None]:
    if r.error is not None:
        return [None] * len(r.scores or [])
    informative = [False] * len(r.scores)
    for m in r.matches:
        if m.comparison.winner is not None:
            informative[m.i] = informative[m.j] = True
    if method == "knockout":
        rounds = max(r.scores) or 1.0  # the champion survived every round
        vals = [s / rounds for s in r.scores]
    else:
        vals = [(s - 1500.0) / 400.0 for s in r.scores]
    return [v if ok else None for v, ok in zip(vals, informative)]


def make_trl_reward(judge: Judge, method: Method = "knockout", votes: int | None = None,
                    timeout: float | None = None) -> Callable[..., list[float | None]]:
    """A TRL GRPOTrainer reward function: each prompt's group of completions is ranked together."""

    def rrm_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        groups = group_by_prompt(prompts)
        rewards: list[float | None] = [None] * len(prompts)
        items, where = [], []
        for query, idx in groups.items():
            if len(idx) < 2:
                continue  # a lone completion has nobody to be compared with: no reward
            items.append((query, [message_text(completions[n], "completion") for n in idx]))
            where.append(idx)
        for idx, r in zip(where, judge.rank_batch(items, method=method, votes=votes, errors="return",
                                                   timeout=timeout)):
            for n, v in zip(idx, ranking_rewards(r, method)):
                rewards[n] = v
        return rewards

    rrm_reward.__name__ = f"rrm_{method}"
    return rrm_reward


def make_verl_compute_score(judge: Judge, query_key: str = "question", votes: int | None = None
                            ) -> Callable[..., float | None]:
    """verl custom reward `compute_score(data_source, solution_str, ground_truth, extra_info=None)`:
    P(solution beats the reference answer `ground_truth`) for the query extra_info[query_key];
    None when the judge gave no valid verdict."""

    def compute_score(data_source: Any, solution_str: str, ground_truth: str, extra_info: dict | None = None
                      ) -> float | None:
        return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info])[0]

    def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[str],
                            extra_infos: Sequence[dict | None] | None = None) -> list[float | None]:
        extra_infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
        if not len(data_sources) == len(solution_strs) == len(ground_truths) == len(extra_infos):
            raise ValueError("data_sources, solution_strs, ground_truths and extra_infos differ in length")
        items = []
        for n, info in enumerate(extra_infos):
            if not isinstance(info, dict) or query_key not in info:
                raise ValueError(f"item {n}: extra_info must be a dict holding the query under {query_key!r}")
            items.append((info[query_key], solution_strs[n], ground_truths[n]))
        out = judge.compare_batch(items, votes=votes, errors="return")
        return [c.p_first for c in out]  # None exactly when no vote was valid

    compute_score.batch = compute_score_batch  # type: ignore[attr-defined]
    return compute_score


class AsyncJudge:
    """asyncio front of a Judge: calls run in a worker thread, one engine loop at a time; an item not
    done within `timeout` seconds is aborted in the engine and comes back invalid (error "timeout")."""

    def __init__(self, judge: Judge, timeout: float | None = None):
        self.judge, self.timeout = judge, timeout
        self._lock = asyncio.Lock()

    async def compare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None):
        async with self._lock:
            return await asyncio.to_thread(self.judge.compare_batch, items, votes, "return", False, self.timeout)

    async def rank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: Method = "knockout",
                         votes: int | None = None):
        async with self._lock:
            return await asyncio.to_thread(self.judge.rank_batch, items, method, votes, "return", False, self.timeout)


def make_async_trl_reward(judge: Judge, method: Method = "knockout", votes: int | None = None,
                          timeout: float | None = None) -> Callable[..., Any]:
    """The TRL reward as a coroutine function; timed-out groups get None, never a made-up score."""
    sync = make_trl_reward(judge, method, votes, timeout)
    lock = asyncio.Lock()

    async def rrm_reward_async(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any):
        async with lock:
            return await asyncio.to_thread(sync, prompts, completions, **kwargs)

    rrm_reward_async.__name__ = f"rrm_{method}_async"
    return rrm_reward_async
