"""Tournaments as small state machines: `ready()` hands out matches whose players are known,
`report()` takes a result. The judge drives them through the engine (a match is submitted as soon as
both its players are known, so rounds overlap); `run_tournament` drives them with any `Comparator`.

Knockout: players shuffled by the seed, paired in a fixed bracket; an odd round gives one bye,
to a random slot that has not had one yet when possible. n - 1 matches over ceil(log2 n) rounds.
A match without a winner (all votes invalid, or a tie) is decided by a seeded coin flip per match and
flagged `invalid`, so the result does not depend on the order in which matches finish.
Scores: rounds survived (champion = rounds). Order: by score, then by matches won, then by index.

RoundRobin (ELO): all n(n-1)/2 pairs, each shown in a seeded random order; ratings by Bradley-Terry
maximum likelihood on the ELO scale (ratings.bt_elo), or sequential ELO averaged over orders.
Matches without a winner contribute nothing to the ratings.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Protocol

from .ratings import Result, bt_elo, elo_sequential


class Comparator(Protocol):
    def __call__(self, i: int, j: int) -> int | None:
        """The winner (i or j) of candidates i and j, or None when undecided."""
        ...


@dataclass
class Match:
    id: int
    round: int
    i: int = -1  # shown first
    j: int = -1
    winner: int | None = None
    done: bool = False
    invalid: bool = False  # no winner came back; a coin flip advanced one player (knockout only)


class Tournament(Protocol):
    matches: list[Match]

    @property
    def done(self) -> bool: ...
    def ready(self) -> list[Match]: ...
    def report(self, match_id: int, winner: int | None) -> None: ...
    def order(self) -> list[int]: ...
    def scores(self) -> list[float]: ...


class _Base:
    def __init__(self, n: int, seed: int):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"a tournament needs at least one player, got {n!r}")
        self.n = n
        self.seed = seed
        self.matches: list[Match] = []
        self._issued: set[int] = set()

    def _check_report(self, match_id: int, winner: int | None) -> Match:
        if not 0 <= match_id < len(self.matches) or match_id not in self._issued:
            raise ValueError(f"match {match_id} was not handed out")
        m = self.matches[match_id]
        if m.done:
            raise ValueError(f"match {match_id} was already reported")
        if winner is not None and winner not in (m.i, m.j):
            raise ValueError(f"winner {winner} did not play match {match_id} ({m.i} vs {m.j})")
        return m

    @property
    def done(self) -> bool:
        return all(m.done for m in self.matches)


class Knockout(_Base):
    def __init__(self, n: int, seed: int = 0):
        super().__init__(n, seed)
        rng = random.Random(seed)
        # a slot is ("p", player) or ("m", match id): the winner of that match
        slots: list[tuple[str, int]] = [("p", p) for p in range(n)]
        rng.shuffle(slots)
        self._sides: list[tuple[tuple[str, int], tuple[str, int]]] = []
        had_bye: set[tuple[str, int]] = set()
        rnd = 1
        while len(slots) > 1:
            bye = None
            if len(slots) % 2:
                bye = rng.choice([s for s in slots if s not in had_bye] or slots)
                slots.remove(bye)
                had_bye.add(bye)
            nxt = []
            for k in range(0, len(slots), 2):
                self.matches.append(Match(id=len(self.matches), round=rnd))
                self._sides.append((slots[k], slots[k + 1]))
                nxt.append(("m", len(self.matches) - 1))
            if bye is not None:
                nxt.append(bye)
            slots, rnd = nxt, rnd + 1
        self.rounds = rnd - 1
        self._champion_slot = slots[0]

    def _resolve(self, slot: tuple[str, int]) -> int | None:
        kind, x = slot
        if kind == "p":
            return x
        m = self.matches[x]
        return m.winner if m.done else None

    def ready(self) -> list[Match]:
        out = []
        for m, (left, right) in zip(self.matches, self._sides):
            if m.id in self._issued:
                continue
            i, j = self._resolve(left), self._resolve(right)
            if i is not None and j is not None:
                m.i, m.j = i, j
                self._issued.add(m.id)
                out.append(m)
        return out

    def report(self, match_id: int, winner: int | None) -> None:
        m = self._check_report(match_id, winner)
        if winner is None:
            m.invalid = True
            winner = m.i if random.Random(f"{self.seed}:{match_id}").random() < 0.5 else m.j
        m.winner, m.done = winner, True

    def champion(self) -> int | None:
        return self._resolve(self._champion_slot)

    def wins(self) -> list[int]:
        wins = [0] * self.n
        for m in self.matches:
            if m.done and m.winner is not None:
                wins[m.winner] += 1
        return wins

    def scores(self) -> list[float]:
        """Rounds survived: the champion scores `rounds`, a player who lost in round r scores r - 1
        (a bye counts as surviving its round, like a win would)."""
        survived = [float(self.rounds)] * self.n
        for m in self.matches:
            if m.done:
                survived[m.j if m.winner == m.i else m.i] = float(m.round - 1)
        return survived

    def order(self) -> list[int]:
        s, wins = self.scores(), self.wins()
        return sorted(range(self.n), key=lambda p: (-s[p], -wins[p], p))


class RoundRobin(_Base):
    def __init__(self, n: int, seed: int = 0, rating: Literal["bt", "sequential"] = "bt", prior: float = 0.1):
        super().__init__(n, seed)
        if rating not in ("bt", "sequential"):
            raise ValueError(f"rating must be 'bt' or 'sequential', got {rating!r}")
        self.rating = rating
        self.prior = prior
        rng = random.Random(seed)
        for a in range(n):
            for b in range(a + 1, n):
                i, j = (a, b) if rng.random() < 0.5 else (b, a)
                self.matches.append(Match(id=len(self.matches), round=1, i=i, j=j))

    def ready(self) -> list[Match]:
        out = [m for m in self.matches if m.id not in self._issued]
        self._issued.update(m.id for m in out)
        return out

    def report(self, match_id: int, winner: int | None) -> None:
        m = self._check_report(match_id, winner)
        m.winner, m.done, m.invalid = winner, True, winner is None

    def results(self) -> list[Result]:
        return [(m.i, m.j, 1.0 if m.winner == m.i else 0.0) for m in self.matches if m.done and m.winner is not None]

    def scores(self) -> list[float]:
        """ELO-scale ratings."""
        if self.rating == "bt":
            return bt_elo(self.n, self.results(), self.prior)
        return elo_sequential(self.n, self.results(), seed=self.seed)

    def order(self) -> list[int]:
        s = self.scores()
        return sorted(range(self.n), key=lambda p: (-s[p], p))


def run_tournament(t: Tournament, compare: Comparator) -> Tournament:
    """Drive a tournament to the end with a synchronous comparator."""
    while not t.done:
        batch = t.ready()
        if not batch:
            raise RuntimeError("tournament stalled: no match is ready but it is not done")
        for m in batch:
            t.report(m.id, compare(m.i, m.j))
    return t
