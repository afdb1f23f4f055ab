"""rrm_engine: a lean decoder runtime for Reward Reasoning Models."""
from .judge import Comparison, Judge, Ranking, parse_verdict
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Judge", "Comparison", "Ranking",
           "parse_verdict"]
