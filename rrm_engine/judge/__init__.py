"""The judge layer: RRM prompts, verdicts, voting, tournaments, the scorer API and training adapters.

Uses the engine only through its public API (rrm_engine.LLM / SamplingParams and the engine's
AsyncLLM); nothing in the engine imports this package.
"""
from .adapters import (AsyncJudge, make_async_trl_reward, make_async_verl_compute_score, make_trl_reward,
                       make_verl_compute_score)
from .judge import Judge
from .prompt import SYSTEM, USER, PromptBuilder, RRMPrompt
from .ratings import bradley_terry, bt_elo, elo_sequential
from .results import Comparison, RankedMatch, Ranking
from .tournament import Comparator, Knockout, Match, RoundRobin, run_tournament
from .verdict import parse_verdict, read_verdict
from .voting import Tally, Vote, tally

__all__ = [
    "AsyncJudge", "make_async_trl_reward", "make_async_verl_compute_score", "make_trl_reward",
    "make_verl_compute_score", "Comparison", "Judge", "RankedMatch", "Ranking",
    "SYSTEM", "USER", "PromptBuilder", "RRMPrompt", "bradley_terry", "bt_elo", "elo_sequential",
    "Comparator", "Knockout", "Match", "RoundRobin", "run_tournament", "parse_verdict", "read_verdict",
    "Tally", "Vote", "tally",
]
