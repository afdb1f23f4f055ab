"""The judge as a verl custom reward function (verl 0.9 reward loop and reward managers).

How verl calls it (verl/experimental/reward_loop/reward_manager/naive.py, limited.py;
verl/workers/reward_manager/naive.py, batch.py):
  * per item, keyword arguments only: compute_score(data_source=, solution_str=, ground_truth=,
    extra_info=, **extra) where extra holds the config's reward_kwargs and, with a reward router,
    reward_router_address= and reward_model_tokenizer=. A coroutine function is awaited on verl's
    event loop (inspect.iscoroutinefunction); a plain function runs in the loop's default thread
    pool, many at once.
  * batch manager: compute_score(data_sources=, solution_strs=, ground_truths=, extra_infos=, **extra).
  * the result is a float or a dict with "score"; every key of the dict becomes a column of
    reward_extra_info, so every item returns the same keys.

What it scores: P(solution beats the reference answer `ground_truth`) for the query
extra_info[query_key] (default "question"), i.e. the comparison's p_first. extra_info may be None or
{}; without a query (and no default_query) the item is invalid. An invalid item (no query, no
reference, no vote with a verdict, a timeout, an engine error) scores `invalid_score` (default 0.0,
configurable; never None, which verl cannot take, and never a win) with rrm_invalid = True.
Returned dict: score, rrm_invalid, rrm_votes, rrm_forced (votes read from log-probs), rrm_invalid_votes.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from .background_loop import run_sync
from .results import Comparison
from .rewards import Scorer


def make_verl_compute_score(scorer: Scorer, query_key: str = "question", votes: int | None = None,
                            invalid_score: float = 0.0, timeout: float | None = None,
                            default_query: str | None = None) -> Callable[..., dict]:
    """A synchronous compute_score (safe from verl's thread pool: calls from many threads are batched
    together in the engine). Its batch form is `compute_score.batch`."""
    core = _VerlScore(scorer, query_key, votes, invalid_score, timeout, default_query)

    def compute_score(data_source: Any = None, solution_str: Any = None, ground_truth: Any = None,
                      extra_info: dict | None = None, **kwargs: Any) -> dict:
        return run_sync(core([solution_str], [ground_truth], [extra_info]))[0]

    def compute_score_batch(data_sources: Sequence[Any] | None = None, solution_strs: Sequence[Any] = (),
                            ground_truths: Sequence[Any] = (), extra_infos: Sequence[dict | None] | None = None,
                            **kwargs: Any) -> list[dict]:
        return run_sync(core(solution_strs, ground_truths, extra_infos))

    compute_score.batch = compute_score_batch  # type: ignore[attr-defined]
    return compute_score


def make_async_verl_compute_score(scorer: Scorer, query_key: str = "question", votes: int | None = None,
                                  invalid_score: float = 0.0, timeout: float | None = None,
                                  default_query: str | None = None) -> Callable[..., Any]:
    """The same as a coroutine function (verl awaits it on its own loop; cancelling it aborts the judgment)."""
    core = _VerlScore(scorer, query_key, votes, invalid_score, timeout, default_query)

    async def compute_score(data_source: Any = None, solution_str: Any = None, ground_truth: Any = None,
                            extra_info: dict | None = None, **kwargs: Any) -> dict:
        return (await core([solution_str], [ground_truth], [extra_info]))[0]

    return compute_score


class _VerlScore:
    def __init__(self, scorer: Scorer, query_key: str, votes: int | None, invalid_score: float,
                 timeout: float | None, default_query: str | None):
        if not isinstance(invalid_score, (int, float)) or isinstance(invalid_score, bool) or math.isnan(invalid_score):
            raise ValueError(f"invalid_score must be a number, got {invalid_score!r}")
        self.scorer, self.query_key, self.votes, self.timeout = scorer, query_key, votes, timeout
        self.invalid_score, self.default_query = float(invalid_score), default_query

    def _query(self, info: Any) -> str | None:
        q = info.get(self.query_key) if isinstance(info, dict) else None
        if not isinstance(q, str) or not q.strip():
            q = self.default_query
        return q

    def _invalid(self, c: Comparison | None = None) -> dict:
        return {"score": self.invalid_score, "rrm_invalid": True, "rrm_votes": len(c.votes) if c else 0,
                "rrm_forced": c.forced if c else 0, "rrm_invalid_votes": c.invalid if c else 0}

    async def __call__(self, solutions: Sequence[Any], references: Sequence[Any],
                       infos: Sequence[dict | None] | None) -> list[dict]:
        infos = list(infos) if infos is not None else [None] * len(solutions)
        if not len(solutions) == len(references) == len(infos):
            raise ValueError(f"solution_strs ({len(solutions)}), ground_truths ({len(references)}) and "
                             f"extra_infos ({len(infos)}) differ in length")
        out: list[dict] = [self._invalid()] * len(solutions)
        items, where = [], []
        for n, (sol, ref, info) in enumerate(zip(solutions, references, infos)):
            q = self._query(info)
            if q is None or not isinstance(sol, str) or ref is None:
                continue  # nothing to judge: invalid, scored invalid_score
            items.append((q, sol, ref if isinstance(ref, str) else str(ref)))
            where.append(n)
        if items:
            done = await self.scorer.acompare_batch(items, votes=self.votes, errors="return", timeout=self.timeout)
            for n, c in zip(where, done):
                if c.error is None and c.p_first is not None:
                    out[n] = {"score": float(c.p_first), "rrm_invalid": False, "rrm_votes": len(c.votes),
                              "rrm_forced": c.forced, "rrm_invalid_votes": c.invalid}
                else:
                    out[n] = self._invalid(c)
        return out
