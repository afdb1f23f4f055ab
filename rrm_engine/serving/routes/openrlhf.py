"""POST /get_reward and /reward: OpenRLHF's remote reward model (openrlhf.py has the semantics)."""
from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Request

from ..judge_api import OpenRLHFBody
from ..limits import cap
from ..openrlhf import openrlhf_rewards
from ..state import on_judge_loop, state_of, watch
from .judge import comparison_cost, matches_of

router = APIRouter(tags=["openrlhf"])


@router.post("/get_reward")
@router.post("/reward")
async def openrlhf_route(body: OpenRLHFBody, request: Request) -> dict:
    st = state_of(request)
    st.check_alive()
    cap("query", len(body.query), st.limits.max_items, "--max-items")
    cfg = st.rlhf
    votes = cfg.votes or st.judge.votes
    # at most: one comparison per labelled query, a ranking of each prompt's other queries
    labelled = sum(isinstance(x, str) and bool(x.strip()) for x in body.labels or [])
    groups = Counter(body.prompts or [])
    work = (labelled + sum(matches_of(cfg.method, k) for k in groups.values())) * comparison_cost(st, votes)
    with st.admission.reserve(work, "reward request"):
        return await watch(request, st.judgments.work(
            request.headers, "get_reward", body.model_dump(),
            lambda: on_judge_loop(openrlhf_rewards(st.judge, body.query, body.prompts, body.labels, cfg)),
            by_hash=cfg.idempotent))
