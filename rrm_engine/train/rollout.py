"""Rollouts for GRPO: judge prompts in a random presentation order, sampled by the engine, scored
by the rule-based reward.

Each rollout of a group draws its own order (chosen shown first or second, probability 1/2), so
the policy cannot earn reward from a position bias; the verdict is mapped back through that order.
Reward: +1 when the verdict picks the ground-truth preferred response, -1 otherwise (an invalid
or missing verdict included). The verdict is read exactly as the RRM release's reference parser reads
it (the box holds "Assistant 1" or "Assistant 2", nothing else; judge/verdict.py): a tolerant reader
would reward \\boxed{\\text{assistant 1}} and teach the judge a format its evaluation scores invalid.
The prompts are built by PromptBuilder.build, so the responses' text never becomes control tokens and
never decides whether the prompt opens a thinking section (judge/prompt.py).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..judge.prompt import SYSTEM, USER, PromptBuilder
from ..judge.verdict import read_verdict
from .data import PreferencePair


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    # the sampled tokens' log-probs under the sampling distribution log_softmax(logits / T),
    # per token when the engine reports them, and their sum always
    logprobs: list[float]  # per token, under log_softmax(logits / T)
    sum_logprob: float
    text: str
    finish_reason: str | None = None


class Sampler(Protocol):
    """What GRPO needs from the inference engine."""

    def sample(self, prompts: list[list[int]], seed: int) -> list[Completion]:
        """One completion per prompt (prompts may repeat: the engine shares their prefix)."""
        ...

    def invalidate_prefix_cache(self) -> None:
        """Called after every optimizer step: cached KV was computed with the old weights."""
        ...


@dataclass(frozen=True)
class RolloutConfig:
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    # appended to the rendered prompt; e.g. "</think>\n\\boxed{Assistant " forces the verdict
    # format (used with a matching verdict_fn) to train or test the verdict step alone
    prompt_suffix: str = ""
    # the published RRM strings by default; another template trains a judge on another format
    system: str | None = SYSTEM
    user_template: str = USER


@dataclass
class Rollout:
    group: int  # index of the pair in the step's batch
    swapped: bool  # True: the rejected response was shown as Assistant 1
    prompt_ids: list[int]
    completion: Completion
    verdict: int | None  # as shown (1 = Assistant 1), None when invalid
    reward: float

    @property
    def correct(self) -> bool:
        return self.reward > 0


VerdictFn = Callable[[str, str | None, bool], "int | None"]


def rrm_verdict(text: str, finish_reason: str | None, opens_think: bool) -> int | None:
    """The judge's rule: the last \\boxed{} after the last </think>; when the prompt did not open a
    thinking section (templates without one), the whole text is the answer, as the judge reads it.
    The box content is read exactly (reading="exact"), as the reference parser does."""
    return read_verdict(text, finish_reason, require_think_end=opens_think, reading="exact")[0]


def reward_for(verdict: int | None, swapped: bool) -> float:
    """+1 when the verdict (as shown) points at the chosen response, -1 otherwise."""
    chosen_shown_as = 2 if swapped else 1
    return 1.0 if verdict == chosen_shown_as else -1.0


class RolloutCollector:
    def __init__(self, tokenizer: Any, cfg: RolloutConfig, verdict_fn: VerdictFn = rrm_verdict):
        if cfg.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO compares rollouts within a group), got {cfg.group_size}")
        self.builder = PromptBuilder(tokenizer, user_template=cfg.user_template, system=cfg.system)
        self.cfg = cfg
        self.verdict_fn = verdict_fn

    def prompt_ids(self, pair: PreferencePair, swapped: bool) -> tuple[list[int], bool]:
        a, b = (pair.rejected, pair.chosen) if swapped else (pair.chosen, pair.rejected)
        # the suffix is trusted (configuration) and counts for opens_think; the pair's text does not
        p = self.builder.build(pair.prompt, a, b, suffix=self.cfg.prompt_suffix)
        return p.token_ids, p.opens_think

    def collect(self, sampler: Sampler, pairs: list[PreferencePair], rng: random.Random) -> list[Rollout]:
        """G rollouts per pair, in pair order; all sampled in one engine call."""
        prompts, meta = [], []
        cache: dict[tuple[int, bool], tuple[list[int], bool]] = {}
        for g, pair in enumerate(pairs):
            for _ in range(self.cfg.group_size):
                swapped = rng.random() < 0.5
                if (g, swapped) not in cache:
                    cache[(g, swapped)] = self.prompt_ids(pair, swapped)
                ids, opens_think = cache[(g, swapped)]
                prompts.append(ids)
                meta.append((g, swapped, opens_think))
        completions = sampler.sample(prompts, seed=rng.randrange(2**31))
        if len(completions) != len(prompts):
            raise RuntimeError(f"sampler returned {len(completions)} completions for {len(prompts)} prompts")
        rollouts = []
        for ids, (g, swapped, opens_think), c in zip(prompts, meta, completions):
            if c.logprobs is not None and len(c.logprobs) != len(c.token_ids):
                raise RuntimeError("sampler returned a completion without one log-prob per token")
            verdict = self.verdict_fn(c.text, c.finish_reason, opens_think)
            rollouts.append(Rollout(g, swapped, ids, c, verdict, reward_for(verdict, swapped)))
        return rollouts
