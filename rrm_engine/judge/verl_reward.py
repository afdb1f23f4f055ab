"""The judge as a verl custom reward function (verl 0.9.1: its reward loop and reward managers).

How verl 0.9.1 calls it (verl/trainer/ppo/reward.py, verl/experimental/reward_loop/reward_loop.py and
reward_manager/naive.py, limited.py; its reward-loop registry holds naive, dapo, gdpo, remote,
rate_limited):
  * per item, keyword arguments only: compute_score(data_source=, solution_str=, ground_truth=,
    extra_info=, **extra) where extra holds the config's reward_kwargs and, with a reward router,
    reward_router_address= and reward_model_tokenizer=. A coroutine function is awaited on verl's
    event loop (inspect.iscoroutinefunction); a plain function runs in the loop's default thread
    pool, many at once.
  * the rate_limited manager wraps each call in asyncio.wait_for(reward.timeout, default 300 s) and
    turns a timeout or an Exception into {"timeout"/"error", "acc"}: other keys than a scored item's.
  * older verl's batch manager (verl/workers/reward_manager/batch.py, which 0.9.1 still ships but
    its config can no longer select) called compute_score(data_sources=, solution_strs=,
    ground_truths=, extra_infos=, **extra): `compute_score.batch` here.
  * the result is a float or a dict with "score"; every key of the dict becomes a column of
    reward_extra_info, so every item returns the same keys.

What it scores: P(solution beats the reference answer `ground_truth`) for the query
extra_info[query_key] (default "question"), i.e. the comparison's p_first.

No query: verl's own MATH and HH-RLHF preprocessors store only split and index in extra_info, so an
item without extra_info[query_key] (and no default_query) raises VerlConfigError naming the key and
the options (query_key / rrm_query_key, default_query / rrm_default_query, missing_query /
rrm_missing_query="invalid"), instead of scoring every item invalid_score and leaving GRPO nothing
to learn. VerlConfigError is a BaseException on purpose: verl's rate_limited manager turns any
Exception into a 0.0 reward (limited.py, run_single), and a misconfiguration must stop the run.
A judge that refuses the request (a 4xx, a ValueError of an in-process Judge) raises it too.

Every other path returns a dict with the same keys, so that verl's reward loop, which builds its
columns from the first item's keys (reward_loop.py, RewardLoopManager.compute_rm_score), never meets
a missing one: score, rrm_invalid, rrm_votes, rrm_forced (votes read from log-probs),
rrm_invalid_votes, rrm_error ("" or why the item is invalid). An invalid item (no reference, no vote
with a verdict, the judgment's timeout, a connection or server error after the client's retries, the
deadline) scores `invalid_score` (default 0.0, configurable; never None, which verl cannot take, and
never a win) with rrm_invalid = True.

Deadlines: `timeout` (default 240 s) is the judgment's on the judge, `deadline` (default 280 s) the
whole call's here, retries included; both below the rate_limited manager's reward.timeout (default
300 s), whose own timeout would give the item other keys ("timeout", "acc"). Set them below yours.
"""
from __future__ import annotations

import asyncio
import math
from typing import Any, Callable, Literal, Sequence

from .background_loop import run_sync
from .results import Comparison
from .rewards import Scorer


TIMEOUT = 240.0  # seconds: the judgment's own, on the judge
DEADLINE = 280.0  # seconds: the whole call's, retries included; both under verl's reward.timeout (300 s)
KEYS = ("score", "rrm_invalid", "rrm_votes", "rrm_forced", "rrm_invalid_votes", "rrm_error")


class VerlConfigError(BaseException):
    """A configuration error that verl must not turn into a 0.0 reward. A BaseException, not an
    Exception, because verl's rate_limited reward manager catches every Exception of a reward function
    and scores the item 0.0 (verl 0.9.1, reward_loop/reward_manager/limited.py); this passes it,
    asyncio and Ray (RayTaskError at ray.get), so the run stops with this message."""


def make_verl_compute_score(scorer: Scorer, query_key: str = "question", votes: int | None = None,
                            invalid_score: float = 0.0, timeout: float | None = TIMEOUT,
                            default_query: str | None = None, deadline: float | None = DEADLINE,
                            missing_query: Literal["raise", "invalid"] = "raise") -> Callable[..., dict]:
    """A synchronous compute_score (safe from verl's thread pool: calls from many threads are batched
    together in the engine). Its batch form is `compute_score.batch`."""
    core = _VerlScore(scorer, query_key, votes, invalid_score, timeout, default_query, deadline, missing_query)

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
                                  invalid_score: float = 0.0, timeout: float | None = TIMEOUT,
                                  default_query: str | None = None, deadline: float | None = DEADLINE,
                                  missing_query: Literal["raise", "invalid"] = "raise") -> Callable[..., Any]:
    """The same as a coroutine function (verl awaits it on its own loop; cancelling it aborts the judgment)."""
    core = _VerlScore(scorer, query_key, votes, invalid_score, timeout, default_query, deadline, missing_query)

    async def compute_score(data_source: Any = None, solution_str: Any = None, ground_truth: Any = None,
                            extra_info: dict | None = None, **kwargs: Any) -> dict:
        return (await core([solution_str], [ground_truth], [extra_info]))[0]

    return compute_score


class _VerlScore:
    def __init__(self, scorer: Scorer, query_key: str, votes: int | None, invalid_score: float,
                 timeout: float | None, default_query: str | None, deadline: float | None, missing_query: str):
        if not isinstance(invalid_score, (int, float)) or isinstance(invalid_score, bool) or math.isnan(invalid_score):
            raise ValueError(f"invalid_score must be a number, got {invalid_score!r}")
        for name, v in (("timeout", timeout), ("deadline", deadline)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
                raise ValueError(f"{name} must be seconds > 0 or None, got {v!r}")
        if timeout is not None and deadline is not None and timeout >= deadline:
            raise ValueError(f"timeout ({timeout} s, the judgment's on the judge) must be below deadline "
                             f"({deadline} s, the whole call's), so that a judgment that times out is answered in time")
        if missing_query not in ("raise", "invalid"):
            raise ValueError(f"missing_query must be 'raise' or 'invalid', got {missing_query!r}")
        if not isinstance(query_key, str) or not query_key:
            raise ValueError(f"query_key must be a non-empty str, got {query_key!r}")
        self.scorer, self.query_key, self.votes = scorer, query_key, votes
        self.timeout, self.deadline = timeout, deadline
        self.invalid_score, self.default_query, self.missing_query = float(invalid_score), default_query, missing_query

    def _query(self, info: Any) -> str | None:
        q = info.get(self.query_key) if isinstance(info, dict) else None
        if not isinstance(q, str) or not q.strip():
            q = self.default_query
        if q is None and self.missing_query == "raise":
            keys = sorted(map(str, info)) if isinstance(info, dict) else None
            raise VerlConfigError(
                f"extra_info has no question to judge under extra_info[{self.query_key!r}] (extra_info "
                f"{'keys: ' + str(keys) if keys is not None else 'is ' + repr(info)}); the judge needs the query. "
                f"verl's own MATH and HH-RLHF preprocessors do not store it. Set reward_kwargs.rrm_query_key to the "
                f"extra_info key that holds it, or reward_kwargs.rrm_default_query to one query for every item, or "
                f"reward_kwargs.rrm_missing_query=invalid to score such items invalid_score with rrm_invalid=True "
                f"(in Python: query_key=, default_query=, missing_query=)")
        return q

    def _invalid(self, why: str, c: Comparison | None = None) -> dict:
        return {"score": self.invalid_score, "rrm_invalid": True, "rrm_votes": len(c.votes) if c else 0,
                "rrm_forced": c.forced if c else 0, "rrm_invalid_votes": c.invalid if c else 0, "rrm_error": why}

    async def _judge(self, items: list[tuple[str, str, str]]) -> list[Comparison] | str:
        """The comparisons, or why there are none (a string): the judge's errors and the deadline are
        an invalid item's, never an exception verl would turn into other keys."""
        call = self.scorer.acompare_batch(items, votes=self.votes, errors="return", timeout=self.timeout)
        try:
            return await (call if self.deadline is None else asyncio.wait_for(call, self.deadline))
        except asyncio.TimeoutError:
            return f"deadline: no answer within {self.deadline} s"
        except ValueError as e:  # the judge refused the request itself (a 4xx): every retry would be refused too
            raise VerlConfigError(f"the judge refused the request: {e}") from e
        except Exception as e:  # connection lost after the client's retries, a 5xx, the engine down
            return f"{type(e).__name__}: {e}"

    async def __call__(self, solutions: Sequence[Any], references: Sequence[Any],
                       infos: Sequence[dict | None] | None) -> list[dict]:
        infos = list(infos) if infos is not None else [None] * len(solutions)
        if not len(solutions) == len(references) == len(infos):
            raise ValueError(f"solution_strs ({len(solutions)}), ground_truths ({len(references)}) and "
                             f"extra_infos ({len(infos)}) differ in length")
        out: list[dict] = [{}] * len(solutions)
        items, where = [], []
        for n, (sol, ref, info) in enumerate(zip(solutions, references, infos)):
            q = self._query(info)
            if q is None:
                out[n] = self._invalid(f"no query: extra_info[{self.query_key!r}] is missing or empty")
            elif not isinstance(sol, str):
                out[n] = self._invalid(f"solution_str is {type(sol).__name__}, not str")
            elif ref is None:
                out[n] = self._invalid("no ground_truth")
            else:
                items.append((q, sol, ref if isinstance(ref, str) else str(ref)))
                where.append(n)
        if items:
            done = await self._judge(items)
            for k, n in enumerate(where):
                c = done[k] if not isinstance(done, str) else None
                if c is not None and c.error is None and c.p_first is not None:
                    out[n] = {"score": float(c.p_first), "rrm_invalid": False, "rrm_votes": len(c.votes),
                              "rrm_forced": c.forced, "rrm_invalid_votes": c.invalid, "rrm_error": ""}
                elif c is not None:
                    out[n] = self._invalid(c.error or "no vote with a verdict", c)
                else:
                    out[n] = self._invalid(done)  # type: ignore[arg-type]
        return out
