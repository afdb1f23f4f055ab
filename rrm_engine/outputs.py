"""What generate() and step() return: one RequestOutput per prompt with n CompletionOutputs."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int  # sample index in 0..n-1
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" (its step failed, or its logits were NaN/inf), None while running
    cumulative_logprob: float  # sum of the sampled tokens' log-probs under the sampling distribution
    # per generated token {token id: log-prob} under the model's distribution (log_softmax of the
    # raw logits): the sampled token, the top-`logprobs` tokens and the `logprob_token_ids`
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    # per generated token, the sampled token's log-prob under the sampling distribution
    # log_softmax(logits / T) (T = 1 when greedy), before top-k/top-p/min-p: what an RL trainer
    # recomputes from the same weights (their sum is cumulative_logprob)
    sampling_logprobs: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False  # all n samples done
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # set when the request failed: an engine step running it raised ("ExcType: message"), or its
    # logits were NaN/inf (a message naming the request)
    error: str | None = None
