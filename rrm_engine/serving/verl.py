"""Module-level entry points for verl's `custom_reward_function` (verl 0.9.1 loads a function by module
path and name, and passes the config's reward_kwargs on every call):

    reward:
      custom_reward_function:
        path: pkg://rrm_engine.serving.verl
        name: compute_score_async        # or compute_score (sync, run in the reward loop's thread pool)
        reward_kwargs:
          rrm_url: http://judge-host:8000   # a shared `python -m rrm_engine serve` ...
          # rrm_api_key: <key>              # its --api-key (default: $RRM_API_KEY of the reward process)
          # rrm_model: /models/RRM-7B       # ... or a judge in each reward process
          rrm_votes: 4
          rrm_invalid_score: 0.0
          rrm_query_key: question           # the extra_info key that holds the query
          # rrm_default_query: "..."        # one query for every item without it
          # rrm_missing_query: invalid      # score items without a query invalid (default: raise)
          rrm_timeout: 240                  # the judgment's deadline on the judge (seconds)
          rrm_deadline: 280                 # the whole call's, retries included; keep both under
                                            # reward.timeout of the rate_limited manager (300)

`compute_score_batch` is the batch form of older verl's batch reward manager; verl 0.9.1's reward loop
cannot select that manager (its registry: naive, dapo, gdpo, remote, rate_limited).

The scorer comes from rrm_url (a JudgeClient), else rrm_model (a Judge of its own, built once per
process; rrm_judge_kwargs go to it and to its LLM), else the environment (RRM_JUDGE_URL,
RRM_JUDGE_MODEL). What is scored, and what an invalid judgment scores, is in
rrm_engine/judge/verl_reward.py. Every other keyword argument verl passes is accepted and ignored.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Sequence

from ..judge.verl_reward import DEADLINE, TIMEOUT, make_async_verl_compute_score, make_verl_compute_score

_lock = threading.Lock()
_scorers: dict[tuple, Any] = {}
_functions: dict[tuple, tuple[Any, Any]] = {}


def _scorer(url: str | None, model: str | None, judge_kwargs: dict | None, api_key: str | None = None) -> Any:
    url = url or os.environ.get("RRM_JUDGE_URL")
    model = model or os.environ.get("RRM_JUDGE_MODEL")
    if not url and not model:
        raise ValueError("no judge: set reward_kwargs.rrm_url (a `python -m rrm_engine serve` server) or "
                         "reward_kwargs.rrm_model, or the environment variable RRM_JUDGE_URL / RRM_JUDGE_MODEL")
    key = ("url", url, api_key) if url else ("model", model, tuple(sorted((judge_kwargs or {}).items())))
    with _lock:
        if key not in _scorers:
            if url:
                from .client import JudgeClient

                # retries with backoff; each judgment keyed (a retry joins the one running)
                _scorers[key] = JudgeClient(url, api_key=api_key)
            else:
                from ..judge.judge import Judge

                _scorers[key] = Judge.from_pretrained(model, **(judge_kwargs or {}))
        return _scorers[key]


def _functions_for(rrm_url: str | None = None, rrm_model: str | None = None, rrm_votes: int | None = None,
                   rrm_query_key: str = "question", rrm_invalid_score: float = 0.0,
                   rrm_timeout: float | None = TIMEOUT, rrm_default_query: str | None = None,
                   rrm_judge_kwargs: dict | None = None, rrm_deadline: float | None = DEADLINE,
                   rrm_missing_query: str = "raise", rrm_api_key: str | None = None, **ignored: Any) -> tuple[Any, Any]:
    """(sync, async) compute_score of this configuration, made once."""
    judge_kwargs = dict(rrm_judge_kwargs or {})
    key = (rrm_url, rrm_api_key, rrm_model, rrm_votes, rrm_query_key, rrm_invalid_score, rrm_timeout,
           rrm_default_query, tuple(sorted(judge_kwargs.items())), rrm_deadline, rrm_missing_query)
    with _lock:
        if key in _functions:
            return _functions[key]
    scorer = _scorer(rrm_url, rrm_model, judge_kwargs, rrm_api_key)
    kw = dict(query_key=rrm_query_key, votes=rrm_votes, invalid_score=rrm_invalid_score, timeout=rrm_timeout,
              default_query=rrm_default_query, deadline=rrm_deadline, missing_query=rrm_missing_query)
    fns = (make_verl_compute_score(scorer, **kw), make_async_verl_compute_score(scorer, **kw))
    with _lock:
        return _functions.setdefault(key, fns)


def compute_score(data_source: Any = None, solution_str: Any = None, ground_truth: Any = None,
                  extra_info: dict | None = None, **kwargs: Any) -> dict:
    """verl's per-item form, synchronous (verl runs it in its loop's thread pool)."""
    return _functions_for(**kwargs)[0](data_source, solution_str, ground_truth, extra_info)


async def compute_score_async(data_source: Any = None, solution_str: Any = None, ground_truth: Any = None,
                              extra_info: dict | None = None, **kwargs: Any) -> dict:
    """verl's per-item form as a coroutine (verl awaits it; cancelling it aborts the judgment)."""
    return await _functions_for(**kwargs)[1](data_source, solution_str, ground_truth, extra_info)


def compute_score_batch(data_sources: Sequence[Any] | None = None, solution_strs: Sequence[Any] = (),
                        ground_truths: Sequence[Any] = (), extra_infos: Sequence[dict | None] | None = None,
                        **kwargs: Any) -> list[dict]:
    """Older verl's batch reward manager form (not selectable in verl 0.9.1): one dict per item."""
    return _functions_for(**kwargs)[0].batch(data_sources, solution_strs, ground_truths, extra_infos)
