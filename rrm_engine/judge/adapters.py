"""The judge inside other training loops: TRL (trl_reward.py), verl (verl_reward.py), and AsyncJudge.

Every adapter takes a scorer: a Judge (in process, over the LLM's shared AsyncLLM) or a
rrm_engine.serving.JudgeClient (the same calls to `python -m rrm_engine serve`). How judgments become
rewards, and what an invalid one becomes, is in rewards.py.
"""
from __future__ import annotations

from typing import Sequence

from .results import Comparison, Ranking
from .rewards import Scorer, group_by_prompt, message_text, ranking_rewards
from .trl_reward import make_async_trl_reward, make_trl_reward
from .verl_reward import make_async_verl_compute_score, make_verl_compute_score

__all__ = ["AsyncJudge", "make_trl_reward", "make_async_trl_reward", "make_verl_compute_score",
           "make_async_verl_compute_score", "message_text", "group_by_prompt", "ranking_rewards"]


class AsyncJudge:
    """asyncio front of a scorer with a default timeout: items not done within `timeout` seconds are
    aborted in the engine and come back invalid (error "timeout"). Usable from any number of event
    loops at once (it holds no loop-bound state)."""

    def __init__(self, judge: Scorer, timeout: float | None = None):
        self.judge, self.timeout = judge, timeout

    async def compare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None) -> list[Comparison]:
        return await self.judge.acompare_batch(items, votes=votes, errors="return", timeout=self.timeout)

    async def rank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: str = "knockout",
                         votes: int | None = None) -> list[Ranking]:
        return await self.judge.arank_batch(items, method=method, votes=votes, errors="return", timeout=self.timeout)
