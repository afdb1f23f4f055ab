"""How to sample one request: SamplingParams, validated when built."""
from __future__ import annotations

from dataclasses import dataclass


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

        if not _is_int(self.n) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0:
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
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
        if self.seed is not None and not _is_int(self.seed):
            bad(f"seed must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            bad(f"logprobs must be an integer >= 0 or None, got {self.logprobs!r}")

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
        if self.logprobs is not None and self.logprobs > vocab_size:
            raise ValueError(f"SamplingParams: logprobs={self.logprobs} exceeds the vocabulary size {vocab_size}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
