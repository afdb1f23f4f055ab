"""How to sample one request: SamplingParams, validated when built."""
from __future__ import annotations

from dataclasses import dataclass


MAX_INT32 = (1 << 31) - 1  # the samplers' int32 tensors (top_k); the same cap for n and max_tokens
# The samplers divide fp32 logits by T: a positive T far below 1 is greedy in effect but can push
# logits / T to +inf (the request would then fail as bad logits) or, tiny enough, round to 0 in
# fp32 (silently greedy); at 1e-6 logits up to 3e32 stay finite. Above MAX every realistic logits
# row is flat already (|logit| <= 100 gives logits / T within 0.01).
MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e4


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt; the prompt is prefilled once and forked n ways
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    max_tokens: int = 16
    stop: str | list[str] | None = None  # stop strings, matched on the detokenised text
    stop_token_ids: list[int] | None = None
    seed: int | None = None  # sample i uses a seed derived from (seed, i): reproducible, batch-independent
    logprobs: int | None = None  # per generated token: the sampled token's and the top-`logprobs` log-probs
    ignore_eos: bool = False
    logprob_token_ids: list[int] | None = None  # also report these ids' log-probs at every generated position
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"SamplingParams: {msg}")

        # every message starts with the field's name (the server answers 400 naming it)
        if not _is_int(self.n) or not 1 <= self.n <= MAX_INT32:
            bad(f"n must be an integer in [1, {MAX_INT32}], got {self.n!r}")
        problem = self.sampler_problem()
        if problem is not None:
            bad(problem)
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_INT32:
            bad(f"max_tokens must be an integer in [1, {MAX_INT32}], got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop = list(self.stop)
        else:
            bad(f"stop must be a str, a list of str or None, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            bad("stop strings must not be empty")
        self.stop_token_ids = self._ids("stop_token_ids", self.stop_token_ids)
        self.logprob_token_ids = self._ids("logprob_token_ids", self.logprob_token_ids)
        if self.seed is not None and (not _is_int(self.seed) or not -(1 << 63) <= self.seed < (1 << 64)):
            bad(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be True or False, got {getattr(self, name)!r}")

    def sampler_problem(self, vocab_size: int | None = None) -> str | None:
        """What is wrong with the values the sampler reads (temperature, top_p, top_k, min_p,
        logprobs, logprob_token_ids), as one message starting with the field's name; None when
        nothing is. With vocab_size also the checks against the model's vocabulary. The engine's
        sampler asks again every step (rrm_engine/core/sampler.py), so a request whose values changed
        after it was added fails alone instead of failing the batch."""
        t = self.temperature
        if not _is_number(t) or not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            return (f"temperature must be 0 (greedy) or a finite number in [{MIN_TEMPERATURE:g}, "
                    f"{MAX_TEMPERATURE:g}], got {t!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            return f"top_p must be in (0, 1], got {self.top_p!r}"
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_INT32:
            return f"top_k must be an integer in [0, {MAX_INT32}] (0 = off), got {self.top_k!r}"
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            return f"min_p must be in [0, 1], got {self.min_p!r}"
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            return f"logprobs must be an integer >= 0 or None, got {self.logprobs!r}"
        if vocab_size is None:
            return None
        if self.logprobs is not None and self.logprobs > vocab_size:
            return f"logprobs={self.logprobs} exceeds the vocabulary size {vocab_size}"
        ids = self.logprob_token_ids
        if not isinstance(ids, list) or not all(_is_int(i) and 0 <= i < vocab_size for i in ids):
            return f"logprob_token_ids must be a list of token ids in [0, {vocab_size}), got {ids!r}"
        return None

    @staticmethod
    def _ids(name: str, ids) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"SamplingParams: {name} must be a list of non-negative token ids, got {ids!r}")
        return [int(i) for i in ids]

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids must exist in the model's vocabulary (checked when a request is added)."""
        for name in ("stop_token_ids", "logprob_token_ids"):
            bad = [i for i in getattr(self, name) if i >= vocab_size]
            if bad:
                raise ValueError(f"SamplingParams: {name} {bad} outside the vocabulary (size {vocab_size})")
        problem = self.sampler_problem(vocab_size)  # logprobs > vocabulary, or values changed since built
        if problem is not None:
            raise ValueError(f"SamplingParams: {problem}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
