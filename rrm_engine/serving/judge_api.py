"""Request bodies of the judge routes: /v1/judge/compare, /v1/judge/rank and OpenRLHF's remote reward
model (/get_reward). Items may be objects ({"query", "a", "b"}, {"query", "candidates"}) or arrays
([query, a, b], [query, [candidates]]), as the Python API takes them; a bad item is refused with its
index and field ("items.3": "item 3: response b must be a str")."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .openai_api import BadField


class _JudgeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # timeout: 1e999 parses as inf
    items: list[Any] = Field(min_length=1)
    votes: int | None = Field(default=None, ge=1)
    timeout: float | None = Field(default=None, ge=0)
    # "raise": a bad or oversized item fails the whole request with 400 before anything runs;
    # "return": it comes back with its `error` set and the other items still run
    errors: Literal["raise", "return"] = "raise"
    texts: bool = True  # include each vote's text and token ids
    # a retry with the same key (or the Idempotency-Key header) joins the judgment instead of rerunning it
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)


def _item(n: int, x: Any, keys: tuple[str, ...]) -> tuple:
    """An item as a tuple in `keys` order, from {"query": .., ...} or [query, ...]; its field types are
    the judge's to check (Judge.validate_pair / validate_rank, with the field's name)."""
    if isinstance(x, dict):
        extra = set(x) - set(keys)
        missing = [k for k in keys if k not in x]
        if extra or missing:
            what = f"unknown field(s) {sorted(extra)}" if extra else f"missing field(s) {missing}"
            raise BadField(f"items.{n}", f"item {n}: {what}; an item is {{{', '.join(map(repr, keys))}}}")
        return tuple(x[k] for k in keys)
    if isinstance(x, list) and len(x) == len(keys):
        return tuple(x)
    raise BadField(f"items.{n}", f"item {n} must be an object with {list(keys)} or a list of {len(keys)}, "
                                 f"got {type(x).__name__}")


class CompareBody(_JudgeBody):
    def triples(self) -> list[tuple]:
        return [_item(n, x, ("query", "a", "b")) for n, x in enumerate(self.items)]


class RankBody(_JudgeBody):
    method: Literal["knockout", "elo"] = "knockout"

    def pairs(self) -> list[tuple]:
        return [_item(n, x, ("query", "candidates")) for n, x in enumerate(self.items)]


class OpenRLHFBody(BaseModel):
    """OpenRLHF's remote reward model request (openrlhf/utils/agent.py, SingleTurnAgentExecutor):
    query[i] is the decoded prompt + response (special tokens kept), prompts[i] the prompt, labels[i]
    the dataset label: any JSON value (OpenRLHF sends the dataset's --label_key column as it is; ""
    without one), read by openrlhf.label_text."""
    model_config = ConfigDict(extra="ignore")
    query: list[str] = Field(min_length=1)
    prompts: list[str] | None = None
    labels: list[Any] | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)


class GroupBody(BaseModel):
    """One rank's slice of a batch for the group rendezvous (/v1/judge/group, groups.py): `group` is the
    key every rank of the batch sends, `world` how many ranks post a slice of it, `items` this rank's
    (query, completion) pairs in its batch order (may be empty). The server joins the slices in rank
    order, ranks each prompt's completions as one group (a group may span ranks), and answers this
    rank its part."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    group: str = Field(min_length=1, max_length=255)
    rank: int = Field(ge=0)
    world: int = Field(ge=1)
    items: list[Any]
    method: Literal["knockout", "elo"] = "knockout"
    votes: int | None = Field(default=None, ge=1)
    timeout: float | None = Field(default=None, ge=0)  # the ranking's own deadline (as /v1/judge/rank)
    wait: float | None = Field(default=None, gt=0)  # how long this rank waits for the others; server default
    texts: bool = False  # include each vote's text and token ids

    def pairs(self) -> list[tuple[str, str]]:
        out = [_item(n, x, ("query", "completion")) for n, x in enumerate(self.items)]
        for n, (q, c) in enumerate(out):
            for name, v in (("query", q), ("completion", c)):
                if not isinstance(v, str):
                    raise BadField(f"items.{n}", f"item {n}: {name} must be a str, got {type(v).__name__}")
        return out
