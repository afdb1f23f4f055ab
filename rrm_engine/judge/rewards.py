"""Judgments as rewards, shared by the training-loop adapters (TRL, verl) and the OpenRLHF route.

A reward is never invented. Where the judge gave no usable verdict the reward is None (TRL reads it as
"no reward from this function"), or, for callers that cannot take None (verl, OpenRLHF), a documented
float (`invalid_reward`, default 0.0) with an invalid flag beside it.

Group scale (GRPO normalises rewards within each group, so only order and spacing matter):
  knockout: rounds survived / rounds, in [0, 1] (champion 1, first-round losers 0). A player who
            played any match without a verdict (advanced or went out on a coin flip) gets None: its
            score rests on a coin, not on the judge.
  elo:      (rating - 1500) / 400, i.e. log10 Bradley-Terry strength; matches without a verdict add
            nothing, and a player none of whose matches had a verdict gets None.
Reference mode (each completion against a reference answer): P(completion beats the reference), the
mean p_first over the votes with a verdict; None when no vote had one.

A scorer is anything with the Judge's batch API: rrm_engine.Judge, or rrm_engine.serving.JudgeClient
(the same calls over HTTP to `python -m rrm_engine serve`).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from .results import Comparison, Ranking, vote_stats


class Scorer(Protocol):
    def compare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None,
                      errors: str = "raise", progress: bool = False, timeout: float | None = None
                      ) -> list[Comparison]: ...
    def rank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: str = "knockout",
                   votes: int | None = None, errors: str = "raise", progress: bool = False,
                   timeout: float | None = None) -> list[Ranking]: ...
    async def acompare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None,
                             errors: str = "raise", progress: bool = False, timeout: float | None = None
                             ) -> list[Comparison]: ...
    async def arank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: str = "knockout",
                          votes: int | None = None, errors: str = "raise", progress: bool = False,
                          timeout: float | None = None) -> list[Ranking]: ...


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


def group_by_prompt(prompts: Sequence[str]) -> dict[str, list[int]]:
    """Indices of each distinct prompt text, in first-seen order (a GRPO group repeats its prompt)."""
    groups: dict[str, list[int]] = {}
    for n, p in enumerate(prompts):
        groups.setdefault(p, []).append(n)
    return groups


def ranking_rewards(r: Ranking, method: str) -> list[float | None]:
    if r.error is not None:
        return [None] * len(r.scores or [])
    n = len(r.scores)
    decided, coin = [False] * n, [False] * n
    for m in r.matches:
        for p in (m.i, m.j):
            if m.comparison.winner is None:
                coin[p] = True
            else:
                decided[p] = True
    if method == "knockout":
        rounds = max(r.scores) or 1.0  # the champion survived every round
        return [None if coin[p] or not decided[p] else r.scores[p] / rounds for p in range(n)]
    return [(r.scores[p] - 1500.0) / 400.0 if decided[p] else None for p in range(n)]


def comparison_reward(c: Comparison) -> float | None:
    """P(first response better) over the votes with a verdict; None when none had one (or it failed)."""
    return None if c.error is not None else c.p_first


def judge_stats(comparisons: Sequence[Comparison], seconds: float) -> dict[str, float]:
    """What the adapters log: invalid rate, forced rate, votes, tokens, seconds (and the counts)."""
    return {**vote_stats(comparisons), "seconds": seconds}


def rankings_comparisons(rankings: Sequence[Ranking]) -> list[Comparison]:
    return [m.comparison for r in rankings for m in r.matches]
