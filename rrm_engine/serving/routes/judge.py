"""POST /v1/judge/compare, /v1/judge/rank and /v1/judge/group (bodies in judge_api.py; the group
rendezvous of trainer ranks in groups.py).

Before the judge sees a request: items, votes and candidates within the caps (400), every item's
text short enough that its prompt could fit the context (else it is refused without tokenising it:
400 with errors="raise", a failed item with errors="return", as the judge itself answers), and
admission (429 / 413). The judge then runs on its background loop, so that tokenising and reading
votes never block this server's event loop."""
from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...judge.results import (comparison_to_dict, failed_comparison, failed_ranking, ranking_to_dict,
                              vote_stats)
from ...judge.rewards import group_by_prompt
from ..groups import Groups, GroupTimeout, SliceConflict
from ..idempotency import fingerprint
from ..judge_api import CompareBody, GroupBody, RankBody
from ..limits import BadField, cap, check_chars
from ..state import ServerState, on_judge_loop, state_of, watch

router = APIRouter(tags=["judge"])


def matches_of(method: str, candidates: int) -> int:
    """Comparisons a ranking plays: a knockout n - 1, a round robin (elo) every pair."""
    return candidates - 1 if method == "knockout" else candidates * (candidates - 1) // 2


def comparison_cost(st: ServerState, votes: int) -> int:
    """Tokens of work one comparison may take: votes x the judge's budget."""
    return votes * st.judge.max_tokens


def _chars(*texts: Any) -> int:
    return sum(len(t) for t in texts if isinstance(t, str))


def screen(st: ServerState, items: list[tuple], chars_of: Callable[[tuple], int], errors: str,
           ) -> tuple[list[int], dict[int, str]]:
    """(indices to judge, {index: why refused}) by the length check that needs no tokenising."""
    keep, refused = [], {}
    for n, item in enumerate(items):
        try:
            check_chars("the judge prompt", chars_of(item), st.chars_per_token, st.max_model_len)
        except BadField as e:
            if errors == "raise":
                raise BadField(f"items.{n}", f"item {n}: {e}") from None
            refused[n] = f"ValueError: {e}"
            continue
        keep.append(n)
    return keep, refused


def count(st: ServerState, comparisons: list[Any]) -> dict:
    stats = vote_stats(comparisons)
    st.metrics.judged(stats, [len(c.votes) for c in comparisons if c.votes])
    return stats


def admit_judge_body(request: Request, body: CompareBody | RankBody) -> tuple[ServerState, int]:
    """(the server's state, the votes each comparison takes) once the engine is alive and the body's
    items and votes are within the server's caps."""
    st = state_of(request)
    st.check_alive()
    cap("items", len(body.items), st.limits.max_items, "--max-items")
    votes = st.judge.votes if body.votes is None else body.votes
    cap("votes", votes, st.limits.max_votes, "--max-votes")
    return st, votes


@router.post("/v1/judge/compare")
async def judge_compare(body: CompareBody, request: Request) -> dict:
    st, votes = admit_judge_body(request, body)
    items = body.triples()
    keep, refused = screen(st, items, lambda x: _chars(*x), body.errors)
    with st.admission.reserve(len(keep) * comparison_cost(st, votes), "judge request"):
        out = await watch(request, st.judgments.work(
            request.headers, "compare", body.model_dump(),
            lambda: on_judge_loop(st.judge.acompare_batch([items[n] for n in keep], votes=body.votes,
                                                          errors=body.errors, timeout=body.timeout))))
    results = [failed_comparison(refused[n]) if n in refused else None for n in range(len(items))]
    for n, c in zip(keep, out):
        results[n] = c
    return {"results": [comparison_to_dict(c, body.texts) for c in results], "stats": count(st, results)}


@router.post("/v1/judge/rank")
async def judge_rank(body: RankBody, request: Request) -> dict:
    st, votes = admit_judge_body(request, body)
    items = body.pairs()
    for n, (_, cands) in enumerate(items):
        if isinstance(cands, (list, tuple)) and len(cands) > st.limits.max_candidates:
            raise BadField(f"items.{n}", f"item {n}: {len(cands)} candidates is more than this server takes "
                                         f"({st.limits.max_candidates}; serve --max-candidates)")

    def longest_match(item: tuple) -> int:  # the query and its two longest candidates (a match's prompt)
        q, cands = item
        lengths = sorted((_chars(c) for c in cands), reverse=True) if isinstance(cands, (list, tuple)) else []
        return _chars(q) + sum(lengths[:2])

    keep, refused = screen(st, items, longest_match, body.errors)
    work = sum(matches_of(body.method, len(items[n][1]) if isinstance(items[n][1], (list, tuple)) else 0)
               for n in keep) * comparison_cost(st, votes)
    with st.admission.reserve(work, "judge request"):
        out = await watch(request, st.judgments.work(
            request.headers, "rank", body.model_dump(),
            lambda: on_judge_loop(st.judge.arank_batch([items[n] for n in keep], method=body.method, votes=body.votes,
                                                       errors=body.errors, timeout=body.timeout))))
    results = [failed_ranking(body.method, refused[n]) if n in refused else None for n in range(len(items))]
    for n, r in zip(keep, out):
        results[n] = r
    return {"results": [ranking_to_dict(r, body.texts) for r in results],
            "stats": count(st, [m.comparison for r in results for m in r.matches])}


def groups_of(request: Request) -> Groups:
    """The app's group rendezvous (its counters are on the app's /metrics from the start)."""
    return state_of(request).groups


async def rank_slices(st: ServerState, slices: list[list[tuple[str, str]]], method: str, votes: int | None,
                      timeout: float | None) -> dict:
    """Every group (completions of one prompt, over all slices in rank order) ranked in one batch on the
    judge's loop: {"rankings": one per group of 2 or more, "positions": per item [ranking, player] or
    None (a group of one), "offsets": where each slice starts, "stats"}."""
    flat = [pair for part in slices for pair in part]
    offsets = [0]
    for part in slices:
        offsets.append(offsets[-1] + len(part))
    groups = [idx for idx in group_by_prompt([q for q, _ in flat]).values() if len(idx) >= 2]
    items = [(flat[idx[0]][0], [flat[i][1] for i in idx]) for idx in groups]
    refused: dict[int, str] = {}
    for n, (q, cands) in enumerate(items):
        if len(cands) > st.limits.max_candidates:
            refused[n] = (f"ValueError: the group has {len(cands)} completions, more than this server ranks at once "
                          f"({st.limits.max_candidates}; serve --max-candidates)")
    def longest_match(item: tuple) -> int:  # the query and its two longest completions (a match's prompt)
        return _chars(item[0]) + sum(sorted((_chars(c) for c in item[1]), reverse=True)[:2])

    keep, too_long = screen(st, items, longest_match, "return")
    refused.update(too_long)
    keep = [n for n in keep if n not in refused]
    votes_each = st.judge.votes if votes is None else votes
    work = sum(matches_of(method, len(items[n][1])) for n in keep) * comparison_cost(st, votes_each)
    with st.admission.reserve(work, "judge group"):
        out = await on_judge_loop(st.judge.arank_batch([items[n] for n in keep], method=method, votes=votes,
                                                       errors="return", timeout=timeout))
    rankings = [failed_ranking(method, refused[n]) if n in refused else None for n in range(len(items))]
    for n, r in zip(keep, out):
        rankings[n] = r
    positions: list[tuple[int, int] | None] = [None] * len(flat)
    for g, idx in enumerate(groups):
        for player, i in enumerate(idx):
            positions[i] = (g, player)
    stats = count(st, [m.comparison for r in rankings for m in r.matches])
    return {"rankings": rankings, "positions": positions, "offsets": offsets, "stats": stats}


@router.post("/v1/judge/group", response_model=None)
async def judge_group(body: GroupBody, request: Request) -> dict | JSONResponse:
    st = state_of(request)
    st.check_alive()
    groups = groups_of(request)
    cap("items", len(body.items), st.limits.max_items, "--max-items")
    cap("votes", st.judge.votes if body.votes is None else body.votes, st.limits.max_votes, "--max-votes")
    pairs = body.pairs()
    params = {"world": body.world, "method": body.method, "votes": body.votes, "timeout": body.timeout}
    try:
        whole = await watch(request, groups.join(
            body.group, body.rank, params, fingerprint("group", [list(p) for p in pairs]), pairs,
            lambda slices: rank_slices(st, slices, body.method, body.votes, body.timeout), body.wait))
    except GroupTimeout as e:
        return JSONResponse({"error": {"message": str(e), "type": "group_timeout", "param": "group", "code": 408,
                                       "missing_ranks": e.missing}}, 408)
    except SliceConflict as e:
        return JSONResponse({"error": {"message": str(e), "type": "conflict", "param": e.field, "code": 409}}, 409)
    # this rank's part: its items' positions, over the rankings they touch (renumbered from 0)
    mine = whole["positions"][whole["offsets"][body.rank]:whole["offsets"][body.rank + 1]]
    touched = sorted({p[0] for p in mine if p is not None})
    local = {g: n for n, g in enumerate(touched)}
    return {"group": body.group, "rank": body.rank,
            "results": [ranking_to_dict(whole["rankings"][g], body.texts) for g in touched],
            "positions": [None if p is None else [local[p[0]], p[1]] for p in mine],
            "stats": whole["stats"]}
