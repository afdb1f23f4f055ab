"""rrm_engine: a lean decoder runtime for Reward Reasoning Models."""
# First, before anything imports torch: OpenMP's wait policy (threads.py says why and what happens
# when torch was imported first).
from .threads import set_wait_policy

set_wait_policy()

from .core.engine import StepError  # noqa: E402
from .judge import Comparison, Judge, Ranking, parse_verdict  # noqa: E402
from .llm import LLM  # noqa: E402
from .outputs import CompletionOutput, RequestOutput  # noqa: E402
from .sampling_params import SamplingParams  # noqa: E402
from .async_engine import AsyncLLM  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Judge", "Comparison", "Ranking",
           "parse_verdict", "AsyncLLM", "StepError"]
