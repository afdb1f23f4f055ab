"""The judge layer: RRM prompts, verdicts, voting, tournaments, the scorer API and training adapters.

Uses the engine only through its public API (rrm_engine.LLM / SamplingParams)."""
from .prompt import SYSTEM, USER, PromptBuilder, RRMPrompt
from .ratings import bradley_terry, bt_elo, elo_sequential
from .tournament import Comparator, Knockout, Match, RoundRobin, run_tournament
from .verdict import parse_verdict, read_verdict
from .voting import Tally, Vote, tally

__all__ = [
    "SYSTEM", "USER", "PromptBuilder", "RRMPrompt", "bradley_terry", "bt_elo", "elo_sequential",
    "Comparator", "Knockout", "Match", "RoundRobin", "run_tournament", "parse_verdict", "read_verdict",
    "Tally", "Vote", "tally",
]
