"""Tournament logic, ratings and voting on a deterministic fake preference (no model needed)."""
from __future__ import annotations

import math
import random

import pytest

from rrm_engine.judge.ratings import bradley_terry, bt_elo, elo_sequential
from rrm_engine.judge.tournament import Knockout, RoundRobin, run_tournament
from rrm_engine.judge.voting import Vote, decided, presentation_orders, tally, unswap


def strength_comparator(strength: list[float], log: list | None = None):
    def compare(i: int, j: int) -> int:
        if log is not None:
            log.append((i, j))
        return i if strength[i] > strength[j] else j

    return compare


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knockout_finds_best_with_n_minus_1_matches(n, seed):
    strength = random.Random(100 + n + seed).sample(range(1000), n)
    log: list = []
    t = run_tournament(Knockout(n, seed=seed), strength_comparator(strength, log))
    best = max(range(n), key=lambda p: strength[p])
    assert len(log) == n - 1 == len(t.matches)
    assert len({tuple(sorted(m)) for m in log}) == n - 1  # no pair twice
    assert t.champion() == best and t.order()[0] == best
    assert t.rounds == (math.ceil(math.log2(n)) if n > 1 else 0)
    assert max((m.round for m in t.matches), default=0) == t.rounds
    assert sorted(t.order()) == list(range(n))
    if n > 1:  # the final's loser is second
        final = t.matches[-1]
        assert t.order()[1] == (final.j if final.winner == final.i else final.i)


def test_knockout_pipelines_rounds():
    t = Knockout(8, seed=3)
    first = t.ready()
    assert len(first) == 4 and t.ready() == []
    t.report(first[0].id, first[0].i)
    assert t.ready() == []  # the round-2 match needs both of its players
    t.report(first[1].id, first[1].j)
    nxt = t.ready()
    assert len(nxt) == 1 and nxt[0].round == 2  # submitted while round 1 is still running
    assert {nxt[0].i, nxt[0].j} == {first[0].i, first[1].j}


def test_knockout_invalid_match_and_bad_reports():
    t = Knockout(2, seed=5)
    (m,) = t.ready()
    with pytest.raises(ValueError, match="did not play"):
        t.report(m.id, 7)
    t.report(m.id, None)
    assert m.invalid and m.winner in (0, 1) and t.done
    with pytest.raises(ValueError, match="already reported"):
        t.report(m.id, 0)
    with pytest.raises(ValueError):
        Knockout(0)


def test_knockout_byes_spread():
    # with 5 players the player given the round-1 bye does not get the round-2 bye too
    for seed in range(20):
        t = run_tournament(Knockout(5, seed=seed), strength_comparator([1, 2, 3, 4, 5]))
        first_round = [99] * 5
        for m in t.matches:
            for p in (m.i, m.j):
                first_round[p] = min(first_round[p], m.round)
        assert max(first_round) <= 2  # nobody waits two rounds (two byes) for a first match


def test_round_robin_recovers_total_order_independent_of_match_order():
    n = 6
    strength = [3, 9, 1, 7, 5, 2]
    truth = sorted(range(n), key=lambda p: -strength[p])
    rr = run_tournament(RoundRobin(n, seed=0), strength_comparator(strength))
    assert len(rr.matches) == n * (n - 1) // 2
    assert rr.order() == truth
    scores = rr.scores()
    # the same results fed in other orders give identical BT ratings
    results = rr.results()
    for s in range(5):
        shuffled = results[:]
        random.Random(s).shuffle(shuffled)
        assert bt_elo(n, shuffled) == pytest.approx(scores, abs=1e-6)
    seq = RoundRobin(n, seed=0, rating="sequential")
    assert run_tournament(seq, strength_comparator(strength)).order() == truth


def test_bradley_terry_matches_known_probabilities():
    # true strengths 1 : 2 : 4 -> large balanced sample recovers the ratios (prior is negligible)
    true = [1.0, 2.0, 4.0]
    results = []
    for i in range(3):
        for j in range(3):
            if i < j:
                p = true[i] / (true[i] + true[j])
                results += [(i, j, p)] * 200  # expected scores as fractional results
    p = bradley_terry(3, results, prior=1e-6)
    assert p[1] / p[0] == pytest.approx(2.0, rel=1e-3)
    assert p[2] / p[0] == pytest.approx(4.0, rel=1e-3)
    elo = bt_elo(3, results, prior=1e-6)
    assert elo[2] - elo[0] == pytest.approx(400 * math.log10(4), rel=1e-3)


def test_undefeated_player_stays_finite():
    elo = bt_elo(3, [(0, 1, 1.0), (0, 2, 1.0), (1, 2, 1.0)])
    assert all(math.isfinite(x) for x in elo) and elo[0] > elo[1] > elo[2]
    with pytest.raises(ValueError):
        bt_elo(2, [(0, 0, 1.0)])
    with pytest.raises(ValueError):
        bradley_terry(2, [(0, 1, 1.5)])


def test_sequential_elo_order_variant_is_averaged():
    results = [(0, 1, 1.0), (1, 2, 1.0), (2, 0, 1.0), (0, 1, 1.0)]
    a = elo_sequential(3, results, shuffles=200, seed=1)
    b = elo_sequential(3, list(reversed(results)), shuffles=200, seed=1)
    assert a[0] > a[2] and b[0] > b[2]
    assert sum(a) == pytest.approx(1500 * 3)


def _v(verdict, p=None, reason="ok"):
    return Vote(verdict, reason if verdict else reason, "", 0, p if p is not None else (None if verdict is None else float(verdict == 1)))


def test_tally_and_tie_rule():
    t = tally([_v(1), _v(2), _v(1), _v(None, reason="no_box"), _v(None, reason="truncated")])
    assert t.counts == (2, 1) and t.invalid == 2 and t.winner == 0
    assert t.invalid_reasons == {"no_box": 1, "truncated": 1}
    assert tally([_v(1), _v(2)]).winner is None  # hard tie
    assert tally([_v(1, 1.0), _v(2, 0.3)]).winner == 0  # soft scores break the tie: mean 0.65
    assert tally([_v(None, reason="empty")] * 3).winner is None  # invalid never wins


def test_decided_and_orders():
    assert decided([_v(1), _v(1)], total=3)
    assert not decided([_v(1)], total=3)
    assert not decided([_v(1), _v(1), _v(2)], total=5)  # 2-1 with 2 left: could tie
    assert decided([_v(1), _v(1), _v(1)], total=5)
    rng = random.Random(0)
    assert presentation_orders(4, "split", rng) == [False, True, False, True]
    r = presentation_orders(5, "random", rng)
    assert len(r) == 5 and all(isinstance(x, bool) for x in r)
    assert presentation_orders(2, "none", rng) == [False, False]
    with pytest.raises(ValueError):
        presentation_orders(0, "none", rng)
    with pytest.raises(ValueError):
        presentation_orders(2, "sometimes", rng)  # type: ignore[arg-type]
    assert unswap(1, 0.8, True) == (2, pytest.approx(0.2))
    assert unswap(None, None, True) == (None, None)
