"""One query's tournament as a coroutine: every match is a PairJob, submitted as soon as both of its
players are known (a knockout's next-round match starts while other first-round matches still run),
so the engine's batch stays full. Cancelling the ranking cancels (and so aborts) its matches."""
from __future__ import annotations

import asyncio
import random

from .pair_job import JudgeSettings, PairJob
from .results import Comparison, RankedMatch, Ranking
from .tournament import Knockout, Match, RoundRobin, Tournament

class RankSettings(JudgeSettings):
    """A comparison's needs plus the judge's seed (the tournament's pairing) and its item generator."""
    seed: int

    def rng(self, *key: object) -> random.Random: ...


async def rank_candidates(judge: RankSettings, query: str, cands: list[str], method: str, votes: int) -> Ranking:
    t: Tournament = Knockout(len(cands), judge.seed) if method == "knockout" else RoundRobin(len(cands), judge.seed)
    records: dict[int, Comparison] = {}
    running: dict[asyncio.Future, Match] = {}

    def start_ready() -> None:
        for m in t.ready():
            job = PairJob(judge, query, cands[m.i], cands[m.j], votes, judge.rng("r", query, *cands, m.id))
            running[asyncio.ensure_future(job.run())] = m

    try:
        start_ready()
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                m = running.pop(task)
                c = task.result()
                records[m.id] = c
                t.report(m.id, None if c.winner is None else (m.i, m.j)[c.winner])
            start_ready()
    finally:
        for task in running:
            task.cancel()
    matches = [RankedMatch(m.i, m.j, m.round, m.winner, m.invalid, records[m.id]) for m in t.matches]
    errs = [r.comparison.error for r in matches if r.comparison.error]
    return Ranking(order=t.order(), scores=t.scores(), matches=matches,
                   invalid=sum(r.comparison.winner is None for r in matches),
                   tokens_used=sum(r.comparison.tokens_used for r in matches), method=method,
                   error=f"{len(errs)} match(es) failed: {errs[0]}" if errs else None)
