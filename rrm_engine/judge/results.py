"""What the judge returns: Comparison (one pair's votes), Ranking (a tournament) and their statistics,
as dataclasses and as plain JSON-able dicts (the HTTP routes and the client use the dict form).

Numbering of the two sides of a comparison: Comparison.winner is the 0-based index (0: a, 1: b, the
public API's contract); Comparison.verdict, Vote.verdict, parse_verdict and dataset labels say 1 (a)
/ 2 (b). The CLI's output rows use 1/2 only (cli.comparison_row)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from .voting import Vote


@dataclass
class Comparison:
    """One comparison's votes. Every vote is exactly one of: valid (verdict read from its text),
    forced (verdict read from log-probs after it ran out of tokens) or invalid (no verdict; never
    counted for either side): valid + forced + invalid == len(votes)."""
    winner: int | None  # 0: response a, 1: response b, None: no decision (see voting.py tie rule)
    votes: list[Vote]
    counts: tuple[int, int]  # votes with a verdict (valid or forced) for a, for b
    p_first: float | None  # mean P(a better) over the votes with a verdict
    invalid: int
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    tokens_used: int = 0  # generated tokens of all votes, forced continuations included
    votes_aborted: int = 0  # adaptive voting: votes stopped once the majority was decided
    tokens_saved: int = 0  # estimate: aborted votes x mean tokens of the completed ones
    error: str | None = None  # this item failed (bad input, engine error, timeout); the others did not
    valid: int = 0  # votes whose verdict was read from the text
    forced: int = 0  # votes whose verdict was forced (truncated, or opted-in non-answers)

    @property
    def verdict(self) -> int | None:
        """The winner numbered as each Vote.verdict, rrm.parse_verdict and the datasets' labels number
        sides: 1 (response a), 2 (response b), None (no decision). `winner` is the 0-based index of the
        same side; the CLI's rows carry this numbering only (`verdict`, no `winner`), so that a row's
        `label == verdict` is a correct verdict."""
        return None if self.winner is None else self.winner + 1


@dataclass
class RankedMatch:
    i: int
    j: int
    round: int
    winner: int | None  # candidate index; knockout fills a coin flip when the comparison had none
    invalid: bool  # the comparison gave no winner (a knockout coin flip decided who advanced)
    comparison: Comparison


@dataclass
class Ranking:
    order: list[int]  # candidate indices, best first
    scores: list[float]  # knockout: rounds survived; elo: ELO-scale Bradley-Terry ratings
    matches: list[RankedMatch]
    invalid: int  # matches whose comparison gave no winner
    tokens_used: int
    method: str = "knockout"
    error: str | None = None

    @property
    def comparisons(self) -> list[Comparison]:
        return [m.comparison for m in self.matches]


def failed_comparison(err: str) -> Comparison:
    return Comparison(None, [], (0, 0), None, 0, error=err)


def failed_ranking(method: str, err: str) -> Ranking:
    return Ranking([], [], [], 0, 0, method, error=err)


def vote_stats(comparisons: Iterable[Comparison]) -> dict[str, float]:
    """Totals over comparisons: votes, valid, forced, invalid, their rates, tokens, failed items."""
    cs = list(comparisons)
    votes = sum(len(c.votes) for c in cs)
    valid, forced, invalid = (sum(c.valid for c in cs), sum(c.forced for c in cs), sum(c.invalid for c in cs))
    return {"comparisons": len(cs), "votes": votes, "valid": valid, "forced": forced, "invalid": invalid,
            "invalid_rate": invalid / votes if votes else 0.0, "forced_rate": forced / votes if votes else 0.0,
            "tokens": sum(c.tokens_used for c in cs), "errors": sum(c.error is not None for c in cs)}


# ---------------------------------------------------------------------------------- dict form
def comparison_to_dict(c: Comparison, texts: bool = True) -> dict[str, Any]:
    d = asdict(c)
    d["counts"] = list(c.counts)
    if not texts:
        for v in d["votes"]:
            v.pop("text", None)
            v.pop("token_ids", None)
    return d


def comparison_from_dict(d: dict[str, Any]) -> Comparison:
    d = dict(d)
    d["votes"] = [Vote(**{"text": "", **v}) for v in d.get("votes", [])]
    d["counts"] = tuple(d.get("counts", (0, 0)))
    return Comparison(**d)


def ranking_to_dict(r: Ranking, texts: bool = True) -> dict[str, Any]:
    d = asdict(r)
    d["matches"] = [{**asdict(m), "comparison": comparison_to_dict(m.comparison, texts)} for m in r.matches]
    return d


def ranking_from_dict(d: dict[str, Any]) -> Ranking:
    d = dict(d)
    d["matches"] = [RankedMatch(**{**m, "comparison": comparison_from_dict(m["comparison"])}) for m in d.get("matches", [])]
    return Ranking(**d)
