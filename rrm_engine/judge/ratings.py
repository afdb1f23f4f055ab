"""Ratings from pairwise results.

`bradley_terry` is the order-independent rating used by the ELO round robin: the maximum-likelihood
Bradley-Terry strengths (Hunter's MM algorithm) with a small symmetric prior — `prior` virtual wins of
every player over every other — so an undefeated player stays finite and disconnected groups stay
comparable. Strengths map to the ELO scale by R = 1500 + 400 log10(p), under which
P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400)) is exactly the Bradley-Terry probability.

`elo_sequential` is the classic update rule (K-factor), which depends on the order of the matches; it
is offered as a variant and made order-independent in distribution by averaging over shuffled orders.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np

# (i, j, s): i met j and scored s in [0, 1] (1: i won, 0: j won, 0.5: a draw)
Result = tuple[int, int, float]

ELO_BASE = 1500.0


def _check(n: int, results: Sequence[Result]) -> None:
    if n < 1:
        raise ValueError(f"need at least one player, got n={n}")
    for i, j, s in results:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"bad match ({i}, {j}) for {n} players")
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"score {s} of match ({i}, {j}) is outside [0, 1]")


def bradley_terry(
    n: int, results: Sequence[Result], prior: float = 0.1, max_iters: int = 10_000, tol: float = 1e-10
) -> list[float]:
    """Bradley-Terry strengths (geometric mean 1) by the MM algorithm."""
    _check(n, results)
    if prior <= 0:
        raise ValueError("prior must be > 0 (it keeps undefeated players finite)")
    wins = np.full((n, n), prior)
    np.fill_diagonal(wins, 0.0)
    for i, j, s in results:
        wins[i, j] += s
        wins[j, i] += 1.0 - s
    games = wins + wins.T  # n_ij
    total_wins = wins.sum(axis=1)
    p = np.ones(n)
    for _ in range(max_iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = total_wins / denom
        new /= math.exp(np.log(new).mean())
        if np.max(np.abs(new - p)) < tol:
            p = new
            break
        p = new
    return p.tolist()


def bt_elo(n: int, results: Sequence[Result], prior: float = 0.1) -> list[float]:
    """Order-independent ELO ratings: Bradley-Terry strengths on the ELO scale."""
    return [ELO_BASE + 400.0 * math.log10(p) for p in bradley_terry(n, results, prior)]


def elo_sequential(
    n: int, results: Sequence[Result], k: float = 32.0, shuffles: int = 100, seed: int = 0
) -> list[float]:
    """Classic sequential ELO averaged over `shuffles` seeded random orders of the matches."""
    _check(n, results)
    rng = random.Random(seed)
    order = list(results)
    total = [0.0] * n
    for _ in range(max(1, shuffles)):
        rng.shuffle(order)
        r = [ELO_BASE] * n
        for i, j, s in order:
            expected = 1.0 / (1.0 + 10 ** ((r[j] - r[i]) / 400.0))
            r[i] += k * (s - expected)
            r[j] -= k * (s - expected)
        total = [t + x for t, x in zip(total, r)]
    return [t / max(1, shuffles) for t in total]
