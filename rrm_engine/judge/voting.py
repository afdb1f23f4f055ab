"""Majority voting over k votes of one comparison.

Votes are always stored in the caller's order: verdict 1 means response a (the first argument) won,
whatever order the prompt showed; a swapped vote has its verdict and p_first mapped back.

Tie rule (documented once, used everywhere): more valid votes wins; on equal counts the mean soft
score p_first decides (it differs from 0.5 only when forced votes carry probabilities); if that is
exactly 0.5 too, or no vote is valid, the winner is None. Invalid votes are counted with their
reasons and never count for either side.

Which votes may be forced (their verdict read from the log-probs of "1" vs "2" after appending
"[</think>] \\boxed{Assistant "): only a vote that ran out of tokens (reason "truncated": the
thinking budget, max_tokens or the context ended it) had no chance to answer, so only it is forced
by default. A vote that finished and gave no answer (\\boxed{both}, \\boxed{}, no box after
</think>, no </think>, nothing) made an explicit non-answer: it stays invalid unless the caller opts
in with force="invalid". force="never" (the judge's strict mode) forces nothing.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Sequence

SwapMode = Literal["random", "split", "none"]
SWAP_MODES = ("random", "split", "none")
ForcePolicy = Literal["truncated", "invalid", "never"]
FORCE_POLICIES = ("truncated", "invalid", "never")


@dataclass
class Vote:
    verdict: int | None  # 1: response a better, 2: response b better, None: invalid
    reason: str  # verdict.Reason, plus "error" when the engine failed the request
    text: str
    tokens: int  # generated tokens of this vote, forced continuation included
    p_first: float | None  # P(response a better): 1.0/0.0 for a read verdict, soft for a forced one
    swapped: bool = False  # the prompt showed b first
    forced: bool = False  # the verdict was read from log-probs after forcing "</think> \\boxed{Assistant "
    token_ids: list[int] = field(default_factory=list)  # the generated tokens (forced text excluded)


@dataclass
class Tally:
    counts: tuple[int, int]  # votes with a verdict (read or forced) for a, for b
    invalid: int  # votes without a verdict
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    p_first: float | None = None  # mean p_first over the votes with a verdict
    winner: int | None = None  # 0: a, 1: b, None: tie or no verdict at all
    valid: int = 0  # verdicts read from the text
    forced: int = 0  # verdicts read from log-probs (truncated votes, or opted-in non-answers)


def may_force(reason: str, policy: ForcePolicy) -> bool:
    """Whether a vote without a verdict, invalid for `reason`, may have its verdict forced."""
    if policy not in FORCE_POLICIES:
        raise ValueError(f"force must be one of {FORCE_POLICIES}, got {policy!r}")
    if reason in ("ok", "abort", "error") or policy == "never":
        return False
    return policy == "invalid" or reason == "truncated"


def unswap(verdict: int | None, p_first: float | None, swapped: bool) -> tuple[int | None, float | None]:
    """Map a verdict read in presentation order back to the caller's order."""
    if not swapped:
        return verdict, p_first
    return (None if verdict is None else 3 - verdict), (None if p_first is None else 1.0 - p_first)


def tally(votes: Sequence[Vote]) -> Tally:
    a = sum(v.verdict == 1 for v in votes)
    b = sum(v.verdict == 2 for v in votes)
    invalid = Counter(v.reason for v in votes if v.verdict is None)
    soft = [v.p_first for v in votes if v.verdict is not None and v.p_first is not None]
    p_first = sum(soft) / len(soft) if soft else None
    if a != b:
        winner: int | None = 0 if a > b else 1
    elif p_first is not None and p_first != 0.5:
        winner = 0 if p_first > 0.5 else 1
    else:
        winner = None
    forced = sum(v.forced and v.verdict is not None for v in votes)
    return Tally((a, b), sum(invalid.values()), dict(invalid), p_first, winner, valid=a + b - forced, forced=forced)


def decided(votes: Sequence[Vote], total: int) -> bool:
    """True once the remaining votes cannot change the winner (they could at most tie it: not decided)."""
    a = sum(v.verdict == 1 for v in votes)
    b = sum(v.verdict == 2 for v in votes)
    return abs(a - b) > total - len(votes)


def presentation_orders(k: int, swap: SwapMode, rng: random.Random) -> list[bool]:
    """swapped flag of each of the k votes.

    random: one coin per vote (p=0.5). The paper's evaluation swapped the two responses at random
            in every call, one sample per call: each vote is such a call. Votes that landed on the
            same order share one prompt (prefilled once and forked), so a comparison prefills at most
            two prompts, and those share the system prompt and the query in the prefix cache.
            (One coin per comparison would show all k votes the same order, and the model's
            position bias alone could then decide a k-0 result.)
    split:  half the votes in each order (alternating, so an early stop still sees both orders);
            odd k puts the extra vote in the given order.
    none:   the given order.
    """
    if k < 1:
        raise ValueError(f"votes must be >= 1, got {k}")
    if swap == "none":
        return [False] * k
    if swap == "split":
        return [i % 2 == 1 for i in range(k)]
    if swap == "random":
        return [rng.random() < 0.5 for _ in range(k)]
    raise ValueError(f"swap must be one of {SWAP_MODES}, got {swap!r}")
