"""rrm_engine: a lean decoder runtime for Reward Reasoning Models."""
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams
