"""rrm_engine: a lean decoder runtime for Reward Reasoning Models."""
import os

# OpenMP threads that spin while waiting collapse when the cores are shared (measured on a 2-core
# machine under load, 2026-11-22: the demo took 213 s with torch's default, 13.8 s with PASSIVE).
# libgomp reads this when torch first loads it, so it only takes effect if rrm_engine is imported
# before torch; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .engine import StepError
from .judge import Comparison, Judge, Ranking, parse_verdict
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams
from .serving import AsyncLLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Judge", "Comparison", "Ranking",
           "parse_verdict", "AsyncLLM", "StepError"]
