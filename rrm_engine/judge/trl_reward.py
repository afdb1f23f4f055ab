"""The judge as a TRL GRPOTrainer reward function (TRL 1.x calling convention).

TRL calls `reward(prompts=, completions=, completion_ids=, <dataset columns>=, trainer_state=,
log_extra=, log_metric=)` on every process with that process's slice of the batch, and gathers the
rewards afterwards. A GRPO group (one prompt's completions) can therefore be split across processes.

Group mode (default): the completions of one prompt over the whole batch (every process's slice) are
ranked once, as one group, and each process returns its own slice of the rewards. A lone completion
(a group of one) gets None. Every process must call the reward function for each batch, as TRL does.
How the slices meet, when there is more than one process (ranks from torch.distributed when it is
initialised, else the RANK / WORLD_SIZE that torchrun and accelerate set):
  * with a JudgeClient (a shared server): no torch.distributed at all. Each process posts its slice to
    the server's group rendezvous (/v1/judge/group, serving/groups.py) under a key every process
    derives alike: the run (`run_id`, else $RRM_RUN_ID, else torchrun's TORCHELASTIC_RUN_ID and restart
    count, else MASTER_ADDR:MASTER_PORT), the function's name, trainer_state.global_step and the number
    of calls at that step (eval calls the reward at the same step as training). The server ranks the
    batch once when every slice is in and answers each process its part; a process whose batch does
    not complete within `wait` seconds gets TimeoutError naming the ranks that never posted.
  * with an in-process Judge: all_gather_object, on the caller's own thread (TRL calls a synchronous
    reward function on its training thread, which holds the current CUDA device). Object collectives
    from a worker thread are reported to hang under NCCL (pytorch/pytorch#115861, #68973), so the
    async form refuses this case with an error (use make_trl_reward, or a JudgeClient): TRL runs async
    reward functions on its own event-loop thread.
Reference mode (`reference_column="solution"`): each completion is compared with that dataset
column's reference answer; the reward is P(completion beats the reference). No gathering is needed.

Invalid -> None (TRL: NaN, ignored by its nan-aware sum); see rewards.py for the scales. When TRL
passes `log_metric`, the judge's statistics of the batch are logged under the function's name
(rrm_knockout, rrm_elo or rrm_reference): <name>/invalid_rate, /forced_rate, /votes, /tokens,
/seconds and /unscored (the fraction of completions without a reward). Group mode logs the totals over all processes (the same on each); reference mode each
process's own (TRL averages them over processes).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

from .background_loop import run_sync
from .results import Ranking
from .rewards import (Scorer, comparison_reward, group_by_prompt, judge_stats, message_text, ranking_rewards,
                      rankings_comparisons)


def make_trl_reward(scorer: Scorer, method: str = "knockout", votes: int | None = None, timeout: float | None = None,
                    reference_column: str | None = None, gather: bool = True, wait: float | None = None,
                    run_id: str | None = None) -> Callable[..., list[float | None]]:
    """A synchronous TRL reward function (safe to call from any thread; with an in-process Judge over
    several processes its collectives run on the calling thread). wait: seconds a process waits at the
    server's group rendezvous for the others' slices (None: the server's default). run_id: the key of
    this training run at the rendezvous (the same on every process; see the module's docstring)."""
    core = _TRLReward(scorer, method, votes, timeout, reference_column, gather, wait, run_id)

    def rrm_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return core.sync(prompts, completions, kwargs)

    rrm_reward.__name__ = core.name
    return rrm_reward


def make_async_trl_reward(scorer: Scorer, method: str = "knockout", votes: int | None = None,
                          timeout: float | None = None, reference_column: str | None = None,
                          gather: bool = True, wait: float | None = None,
                          run_id: str | None = None) -> Callable[..., Any]:
    """The same reward as a coroutine function (TRL runs those on its own event loop, next to the others).
    Group mode over several processes needs a JudgeClient here (see the module's docstring)."""
    core = _TRLReward(scorer, method, votes, timeout, reference_column, gather, wait, run_id)

    async def rrm_reward_async(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return await core.acall(prompts, completions, kwargs)

    rrm_reward_async.__name__ = core.name + "_async"
    return rrm_reward_async


class _TRLReward:
    def __init__(self, scorer: Scorer, method: str, votes: int | None, timeout: float | None,
                 reference_column: str | None, gather: bool, wait: float | None, run_id: str | None):
        if method not in ("knockout", "elo"):
            raise ValueError(f"method must be 'knockout' or 'elo', got {method!r}")
        if wait is not None and not wait > 0:
            raise ValueError(f"wait must be > 0 seconds or None, got {wait!r}")
        self.scorer, self.method, self.votes, self.timeout = scorer, method, votes, timeout
        self.reference_column, self.gather, self.wait, self.run_id = reference_column, gather, wait, run_id
        self.name = "rrm_reference" if reference_column else f"rrm_{method}"
        self._step: Any = None
        self._calls_at_step = 0

    # --------------------------------------------------------------------------- entry points
    def sync(self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: dict) -> list[float | None]:
        t0 = time.perf_counter()
        queries, texts = _texts(prompts, completions)
        dist = self._collective()
        if dist is not None:  # the collectives on this (the caller's) thread; only the judging is elsewhere
            rewards, stats = self._gathered(dist, queries, texts)
        else:
            rewards, stats = run_sync(self._score(queries, texts, kwargs))
        return self._finish(rewards, stats, t0, kwargs)

    async def acall(self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: dict) -> list[float | None]:
        t0 = time.perf_counter()
        queries, texts = _texts(prompts, completions)
        if self._collective() is not None:
            raise RuntimeError(
                f"{self.name}_async: group mode over {_process_group().get_world_size()} processes with an in-process "
                f"Judge would run a torch.distributed collective on TRL's event-loop thread (object collectives "
                f"from a thread other than the trainer's are reported to hang under NCCL). Give it a JudgeClient "
                f"(the server ranks each group once, no collective), or use make_trl_reward")
        rewards, stats = await self._score(queries, texts, kwargs)
        return self._finish(rewards, stats, t0, kwargs)

    def _finish(self, rewards: list[float | None], stats: dict, t0: float, kwargs: dict) -> list[float | None]:
        stats["seconds"] = max(stats.get("seconds", 0.0), time.perf_counter() - t0)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            for key in ("invalid_rate", "forced_rate", "votes", "tokens", "seconds"):
                log_metric(f"{self.name}/{key}", float(stats[key]))
            log_metric(f"{self.name}/unscored", sum(r is None for r in rewards) / max(1, len(rewards)))
        return rewards

    # ---------------------------------------------------------------------------- scoring
    def _collective(self) -> Any:
        """torch.distributed, when this call gathers with it: group mode, an in-process scorer (a
        JudgeClient meets the other processes on its server instead), more than one process."""
        if self.reference_column is not None or not self.gather or hasattr(self.scorer, "arank_group"):
            return None
        return _process_group()

    async def _score(self, queries: list[str], texts: list[str], kwargs: dict):
        if self.reference_column is not None:
            return await self._against_reference(queries, texts, kwargs)
        rank, world = _rank_world() if self.gather else (0, 1)
        if world > 1 and hasattr(self.scorer, "arank_group"):
            return await self._rendezvous(rank, world, queries, texts, kwargs)
        # one process (or gather=False): this slice's groups alone
        rewards, stats = await self._rank_groups(queries, texts)
        return [rewards.get(n) for n in range(len(queries))], stats

    async def _against_reference(self, queries: list[str], texts: list[str], kwargs: dict):
        refs = kwargs.get(self.reference_column)
        if refs is None or len(refs) != len(texts):
            raise ValueError(f"reference mode needs the dataset column {self.reference_column!r} with one "
                             f"reference per completion (got {'none' if refs is None else len(refs)})")
        t0 = time.perf_counter()
        out = await self.scorer.acompare_batch([(q, c, str(r)) for q, c, r in zip(queries, texts, refs)],
                                               votes=self.votes, errors="return", timeout=self.timeout)
        return [comparison_reward(c) for c in out], judge_stats(out, time.perf_counter() - t0)

    async def _rank_groups(self, queries: list[str], texts: list[str], only: Callable[[int], bool] = lambda g: True):
        """{index: reward} over the groups (by prompt) of these items that `only` selects, and the stats."""
        groups = [idx for g, idx in enumerate(group_by_prompt(queries).values()) if only(g) and len(idx) >= 2]
        t0 = time.perf_counter()
        rankings = await self.scorer.arank_batch([(queries[idx[0]], [texts[i] for i in idx]) for idx in groups],
                                                 method=self.method, votes=self.votes, errors="return",
                                                 timeout=self.timeout)
        rewards: dict[int, float | None] = {}
        for idx, r in zip(groups, rankings):
            rewards.update(zip(idx, _rewards_of(r, self.method, len(idx))))
        return rewards, judge_stats(rankings_comparisons(rankings), time.perf_counter() - t0)

    def _gathered(self, dist: Any, queries: list[str], texts: list[str]):
        """In-process judge over several processes: gather the slices (on this thread), rank groups
        g % world == rank here, gather the rewards back."""
        rank, world = dist.get_rank(), dist.get_world_size()
        slices = _all_gather(dist, list(zip(queries, texts)))
        flat = [x for s in slices for x in s]
        offset = sum(len(s) for s in slices[:rank])
        mine: dict[int, float | None] = {}
        stats: dict[str, float] = {}
        error = None
        try:  # never raise before the gather below: the other processes would wait for us forever
            mine, stats = run_sync(self._rank_groups([q for q, _ in flat], [t for _, t in flat],
                                                     only=lambda g: g % world == rank))
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        everyone = _all_gather(dist, (mine, stats, error))
        errors = [e for _, _, e in everyone if e]
        if errors:
            raise RuntimeError(f"the judge failed on {len(errors)} process(es): {errors[0]}")
        rewards: dict[int, float | None] = {}
        for part, _, _ in everyone:
            rewards.update(part)
        return [rewards.get(offset + n) for n in range(len(queries))], _merge_stats([s for _, s, _ in everyone])

    async def _rendezvous(self, rank: int, world: int, queries: list[str], texts: list[str], kwargs: dict):
        """A JudgeClient over several processes: the server's group rendezvous (no torch.distributed)."""
        t0 = time.perf_counter()
        part = await self.scorer.arank_group(self._group_key(kwargs), rank, world, list(zip(queries, texts)),
                                             method=self.method, votes=self.votes, timeout=self.timeout,
                                             wait=self.wait)
        rewards = [None if p is None else _rewards_of(part.rankings[p[0]], self.method, p[1] + 1)[p[1]]
                   for p in part.positions]
        return rewards, {**part.stats, "seconds": time.perf_counter() - t0}

    def _group_key(self, kwargs: dict) -> str:
        """The same on every process for the same batch: run, function, step, call at that step."""
        state = kwargs.get("trainer_state")
        step = getattr(state, "global_step", None)
        if step != self._step:
            self._step, self._calls_at_step = step, 0
        self._calls_at_step += 1
        return f"{_run_id(self.run_id)}/{self.name}/step{step}/call{self._calls_at_step}"


def _texts(prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[list[str], list[str]]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [message_text(p, "prompt") for p in prompts], [message_text(c, "completion") for c in completions]


def _rewards_of(r: Ranking, method: str, n: int) -> list[float | None]:
    """The players' rewards; None for each when the ranking failed (a failed ranking has no scores)."""
    return [None] * n if r.error is not None else ranking_rewards(r, method)


def _run_id(given: str | None) -> str:
    """This training run's name at the rendezvous, the same on all its processes without a collective."""
    if given is not None:
        return given
    if os.environ.get("RRM_RUN_ID"):
        return os.environ["RRM_RUN_ID"]
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":  # torchrun: restarts of the job reuse the id, so count them
        return f"{elastic}.r{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"{addr}:{port}" if addr and port else "run"


def _rank_world() -> tuple[int, int]:
    """(rank, world size) without a collective: torch.distributed's when initialised, else the
    environment of torchrun / accelerate (RANK, WORLD_SIZE), else one process."""
    dist = _process_group()
    if dist is not None:
        return dist.get_rank(), dist.get_world_size()
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} must be "
                         f"integers") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world}) (the environment of torchrun / accelerate)")
    return rank, world


def _process_group() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _all_gather(dist: Any, obj: Any) -> list[Any]:
    """A blocking object collective, on the calling thread (see the module's docstring for why)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _merge_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    keys = ("comparisons", "votes", "valid", "forced", "invalid", "tokens", "errors")
    total = {k: sum(p.get(k, 0) for p in parts) for k in keys}
    votes = total["votes"]
    total["invalid_rate"] = total["invalid"] / votes if votes else 0.0
    total["forced_rate"] = total["forced"] / votes if votes else 0.0
    total["seconds"] = max((p.get("seconds", 0.0) for p in parts), default=0.0)
    return total
