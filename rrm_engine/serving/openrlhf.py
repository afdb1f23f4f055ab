"""OpenRLHF's remote reward model on the judge: {"query", "prompts", "labels"} -> {"rewards", "scores",
"extra_logs"}, the shape OpenRLHF posts to --remote_rm_url (openrlhf/utils/agent.py) and its own
serve_rm answers (openrlhf/cli/serve_rm.py).

Each query[i] is the prompt followed by the response, so the response is query[i] minus the prefix
prompts[i], with trailing end-of-turn markers (`end_markers`) and whitespace removed. The RRM query is
prompts[i] as sent (OpenRLHF sends the chat-formatted prompt when it applies a chat template).
  * labels[i] a non-empty label: reference mode, reward = P(response beats the label). A label may be
    any JSON value (OpenRLHF sends the dataset's --label_key column as it is): a string is the
    reference answer as written, a number, boolean, array or object is read as its JSON text (42,
    3.5, true, {"answer": "42"}); null and "" mean no label;
  * otherwise the responses that share a prompt in this request are ranked together (rewards.py
    scales); a response alone with its prompt and without a label cannot be judged.
OpenRLHF's single-turn executor posts one query per request, so with it use labels (its --label_key)
as reference answers. Whatever cannot be judged, or got no verdict, scores `invalid_reward` (default
0.0; OpenRLHF cannot take null) with extra_logs.rrm_invalid = 1.0, never a win.

Deadline: OpenRLHF's client (openrlhf/utils/agent.py, _fetch_rewards_via_http, OpenRLHF 0.11.2) gives up
on an answer after 180 s (aiohttp total timeout) and posts the same body again, 5 times, 1 s apart.
`timeout` (serve --rm-timeout, default 170 s) ends the judgment before that: what has no verdict by
then scores invalid_reward, flagged. The server keys /get_reward by the hash of its body
(idempotency.py), so a retry after a dropped connection joins the judgment already running.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from ..judge.rewards import Scorer, comparison_reward, group_by_prompt, ranking_rewards
from .openai_api import BadField

END_MARKERS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<｜end▁of▁sentence｜>", "<|end|>")


@dataclass
class OpenRLHFConfig:
    method: str = "knockout"
    invalid_reward: float = 0.0
    end_markers: tuple[str, ...] = END_MARKERS
    votes: int | None = None
    timeout: float | None = 170.0  # seconds; under OpenRLHF's 180 s client timeout
    idempotent: bool = True  # key each request by its body's hash (a retry joins the running judgment)


def label_text(label: Any) -> str | None:
    """The reference answer of an OpenRLHF label of any JSON type (None: no label)."""
    if label is None:
        return None
    if isinstance(label, str):
        return label if label.strip() else None
    return json.dumps(label, ensure_ascii=False)


def response_of(query: str, prompt: str, end_markers: Sequence[str]) -> str | None:
    if not query.startswith(prompt):
        return None
    text = query[len(prompt):]
    stripped = True
    while stripped:
        stripped = False
        text = text.rstrip()
        for m in end_markers:
            if m and text.endswith(m):
                text, stripped = text[: -len(m)], True
    return text


async def openrlhf_rewards(scorer: Scorer, queries: list[str], prompts: list[str] | None,
                           labels: list[Any] | None, cfg: OpenRLHFConfig) -> dict[str, Any]:
    n = len(queries)
    if prompts is None or len(prompts) != n:
        raise BadField("prompts", f"prompts must hold one prompt per query ({n}), got "
                                  f"{'none' if prompts is None else len(prompts)}")
    if labels is not None and len(labels) != n:
        raise BadField("labels", f"labels must hold one label per query ({n}) or be absent, got {len(labels)}")
    labels = [label_text(x) for x in labels] if labels is not None else [None] * n
    responses = [response_of(q, p, cfg.end_markers) for q, p in zip(queries, prompts)]
    rewards: list[float | None] = [None] * n
    votes, forced = [0] * n, [0] * n
    ref = [i for i in range(n) if responses[i] is not None and labels[i] is not None]
    if ref:
        out = await scorer.acompare_batch([(prompts[i], responses[i], labels[i]) for i in ref], votes=cfg.votes,
                                          errors="return", timeout=cfg.timeout)
        for i, c in zip(ref, out):
            rewards[i], votes[i], forced[i] = comparison_reward(c), len(c.votes), c.forced
    judged = set(ref)
    rest = [i for i in range(n) if responses[i] is not None and i not in judged]
    groups = [[rest[k] for k in idx] for idx in group_by_prompt([prompts[i] for i in rest]).values() if len(idx) >= 2]
    if groups:
        out = await scorer.arank_batch([(prompts[g[0]], [responses[i] for i in g]) for g in groups],
                                       method=cfg.method, votes=cfg.votes, errors="return", timeout=cfg.timeout)
        for g, r in zip(groups, out):
            for i, v in zip(g, ranking_rewards(r, cfg.method)):
                rewards[i] = v
            for m in r.matches:
                for p in (m.i, m.j):
                    votes[g[p]] += len(m.comparison.votes)
                    forced[g[p]] += m.comparison.forced
    final = [cfg.invalid_reward if r is None else float(r) for r in rewards]
    return {"rewards": final, "scores": final,
            "extra_logs": {"rrm_invalid": [float(r is None) for r in rewards], "rrm_votes": [float(v) for v in votes],
                           "rrm_forced_votes": [float(f) for f in forced]}}
