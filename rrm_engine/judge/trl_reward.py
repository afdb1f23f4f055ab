"""The judge as a TRL GRPOTrainer reward function (TRL 1.x calling convention).

TRL calls `reward(prompts=, completions=, completion_ids=, <dataset columns>=, trainer_state=,
log_extra=, log_metric=)` on every process with that process's slice of the batch, and gathers the
rewards afterwards. A GRPO group (one prompt's completions) can therefore be split across processes.

Group mode (default): the slices are gathered inside the reward function (torch.distributed
all_gather_object, when a process group of more than one process is initialised), every group is
ranked once and whole (group g by process g % world_size), the rewards are gathered back, and each
process returns its own slice. Every process must call the reward function for each batch, as TRL
does. A lone completion (a group of one) gets None.
Reference mode (`reference_column="solution"`): each completion is compared with that dataset
column's reference answer; the reward is P(completion beats the reference). No gathering is needed.

Invalid -> None (TRL: NaN, ignored by its nan-aware sum); see rewards.py for the scales. When TRL
passes `log_metric`, the judge's statistics of the batch are logged under the function's name
(rrm_knockout, rrm_elo or rrm_reference): <name>/invalid_rate, /forced_rate, /votes, /tokens,
/seconds and /unscored (the fraction of completions without a reward). Group mode logs the totals over all processes (the same on each); reference mode each
process's own (TRL averages them over processes).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

from .background_loop import run_sync
from .rewards import (Scorer, comparison_reward, group_by_prompt, judge_stats, message_text, ranking_rewards,
                      rankings_comparisons)


def make_trl_reward(scorer: Scorer, method: str = "knockout", votes: int | None = None, timeout: float | None = None,
                    reference_column: str | None = None, gather: bool = True) -> Callable[..., list[float | None]]:
    """A synchronous TRL reward function (safe to call from any thread)."""
    core = _TRLReward(scorer, method, votes, timeout, reference_column, gather)

    def rrm_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return run_sync(core(prompts, completions, kwargs))

    rrm_reward.__name__ = core.name
    return rrm_reward


def make_async_trl_reward(scorer: Scorer, method: str = "knockout", votes: int | None = None,
                          timeout: float | None = None, reference_column: str | None = None,
                          gather: bool = True) -> Callable[..., Any]:
    """The same reward as a coroutine function (TRL runs those on its own event loop, next to the others)."""
    core = _TRLReward(scorer, method, votes, timeout, reference_column, gather)

    async def rrm_reward_async(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return await core(prompts, completions, kwargs)

    rrm_reward_async.__name__ = core.name + "_async"
    return rrm_reward_async


class _TRLReward:
    def __init__(self, scorer: Scorer, method: str, votes: int | None, timeout: float | None,
                 reference_column: str | None, gather: bool):
        if method not in ("knockout", "elo"):
            raise ValueError(f"method must be 'knockout' or 'elo', got {method!r}")
        self.scorer, self.method, self.votes, self.timeout = scorer, method, votes, timeout
        self.reference_column, self.gather = reference_column, gather
        self.name = "rrm_reference" if reference_column else f"rrm_{method}"

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: dict) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        t0 = time.perf_counter()
        queries = [message_text(p, "prompt") for p in prompts]
        texts = [message_text(c, "completion") for c in completions]
        if self.reference_column is not None:
            rewards, stats = await self._against_reference(queries, texts, kwargs)
        else:
            rewards, stats = await self._groups(queries, texts)
        stats["seconds"] = max(stats.get("seconds", 0.0), time.perf_counter() - t0)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            for key in ("invalid_rate", "forced_rate", "votes", "tokens", "seconds"):
                log_metric(f"{self.name}/{key}", float(stats[key]))
            log_metric(f"{self.name}/unscored", sum(r is None for r in rewards) / max(1, len(rewards)))
        return rewards

    async def _against_reference(self, queries: list[str], texts: list[str], kwargs: dict):
        refs = kwargs.get(self.reference_column)
        if refs is None or len(refs) != len(texts):
            raise ValueError(f"reference mode needs the dataset column {self.reference_column!r} with one "
                             f"reference per completion (got {'none' if refs is None else len(refs)})")
        t0 = time.perf_counter()
        out = await self.scorer.acompare_batch([(q, c, str(r)) for q, c, r in zip(queries, texts, refs)],
                                               votes=self.votes, errors="return", timeout=self.timeout)
        return [comparison_reward(c) for c in out], judge_stats(out, time.perf_counter() - t0)

    async def _groups(self, queries: list[str], texts: list[str]):
        dist = _process_group() if self.gather else None
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
        slices = await _all_gather(dist, list(zip(queries, texts)))
        flat = [x for s in slices for x in s]
        offset = sum(len(s) for s in slices[:rank])
        groups = [(q, idx) for g, (q, idx) in enumerate(group_by_prompt([q for q, _ in flat]).items())
                  if g % world == rank and len(idx) >= 2]
        mine: dict[int, float | None] = {}
        stats: dict[str, float] = {}
        error = None
        t0 = time.perf_counter()
        try:  # never raise before the gather below: the other processes would wait for us forever
            rankings = await self.scorer.arank_batch([(q, [flat[i][1] for i in idx]) for q, idx in groups],
                                                     method=self.method, votes=self.votes, errors="return",
                                                     timeout=self.timeout)
            for (_, idx), r in zip(groups, rankings):
                mine.update(zip(idx, ranking_rewards(r, self.method)))
            stats = judge_stats(rankings_comparisons(rankings), time.perf_counter() - t0)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        everyone = await _all_gather(dist, (mine, stats, error))
        errors = [e for _, _, e in everyone if e]
        if errors:
            raise RuntimeError(f"the judge failed on {len(errors)} process(es): {errors[0]}")
        rewards: dict[int, float | None] = {}
        for part, _, _ in everyone:
            rewards.update(part)
        return [rewards.get(offset + n) for n in range(len(queries))], _merge_stats([s for _, s, _ in everyone])


def _process_group() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


async def _all_gather(dist: Any, obj: Any) -> list[Any]:
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    # a blocking collective: off the event loop, which other judge calls may share
    await asyncio.to_thread(dist.all_gather_object, out, obj)
    return out


def _merge_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    keys = ("comparisons", "votes", "valid", "forced", "invalid", "tokens", "errors")
    total = {k: sum(p.get(k, 0) for p in parts) for k in keys}
    votes = total["votes"]
    total["invalid_rate"] = total["invalid"] / votes if votes else 0.0
    total["forced_rate"] = total["forced"] / votes if votes else 0.0
    total["seconds"] = max((p.get("seconds", 0.0) for p in parts), default=0.0)
    return total
