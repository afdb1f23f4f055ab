"""A small client of `python -m rrm_engine serve` (httpx), synchronous and asynchronous.

JudgeClient has the Judge's batch API (compare_batch / rank_batch and their a- forms, compare, rank),
returning the same Comparison / Ranking objects, so every adapter (TRL, verl) takes it in place of an
in-process Judge: many trainer processes then share one server and its engine. It also speaks the
OpenAI routes (completions, chat) and OpenRLHF's reward shape.

Retries: a connection error, a timeout, a 5xx or a 429 is retried with exponential backoff and
jitter (`retries` times; a 429's / 503's Retry-After is honoured), within `deadline` seconds per call
if one is set. Every judgment (compare / rank / OpenRLHF) carries an idempotency key (`Idempotency-Key`
header; given, or a new one per call) that its retries reuse, so a retry after a dropped connection
joins the judgment still running on the server instead of starting it again (idempotency.py). Calls
without a key (completions, chat) are retried only when the request cannot have run (the connection
was refused, or a 429 / 502 / 503 / 504). `timeout` is each attempt's; the judgment's own deadline on
the server is the `timeout` argument of the judge methods.

A 408 (a group rendezvous that did not complete) raises TimeoutError naming the missing ranks; another
4xx answer raises ValueError with the server's message (the field it names included); a 5xx after
the last retry RuntimeError; a transport failure after the last retry the httpx error, a spent
`deadline` TimeoutError. The sync methods are safe from several threads (one httpx.Client per thread);
the async ones open a client per call, so they work from any event loop.
"""
from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import httpx

from .idempotency import HEADER

from ..judge.results import Comparison, Ranking, comparison_from_dict, ranking_from_dict


# statuses worth another try: the server is overloaded, restarting, or behind a proxy that gave up
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# ... and those that say an unkeyed request did not run (a 500 may have come after it ran)
RETRY_STATUS_UNKEYED = frozenset({429, 502, 503, 504})


@dataclass
class GroupPart:
    """One rank's answer from the group rendezvous: the rankings its items play in, each item's
    (ranking index, player index) in them or None (its prompt had one completion in the whole batch),
    and the judge's statistics over the whole batch (the same on every rank)."""
    rankings: list[Ranking]
    positions: list[tuple[int, int] | None]
    stats: dict[str, float]


class JudgeClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float | None = 600.0, retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0, deadline: float | None = None,
                 api_key: str | None = None):
        """api_key: sent as `Authorization: Bearer <key>` (serve --api-key); default $RRM_API_KEY."""
        for name, v in (("retries", retries), ("backoff", backoff), ("max_backoff", max_backoff)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if deadline is not None and not deadline > 0:
            raise ValueError(f"deadline must be > 0 seconds or None, got {deadline!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries, self.backoff, self.max_backoff, self.deadline = int(retries), backoff, max_backoff, deadline
        self.attempts = 0  # HTTP attempts made (retries included), for logs and tests
        key = api_key if api_key is not None else os.environ.get("RRM_API_KEY")
        self._auth = {"Authorization": f"Bearer {key}"} if key else {}
        self._local = threading.local()

    # --------------------------------------------------------------------------- transport
    def _client(self) -> httpx.Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self._auth)
        return c

    @staticmethod
    def _check(r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                err = r.json().get("error", {})
                msg = err.get("message") or r.text
            except ValueError:
                msg = r.text
            if r.status_code == 408:  # a group rendezvous that did not complete (it names the missing ranks)
                raise TimeoutError(f"408: {msg}")
            if 400 <= r.status_code < 500:
                raise ValueError(f"{r.status_code}: {msg}")
            raise RuntimeError(f"server error {r.status_code}: {msg}")
        return r.json()

    # ------------------------------------------------------------------------------ retries
    def _retry_after(self, attempt: int, error: BaseException | None, r: httpx.Response | None, keyed: bool,
                     end: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None: do not retry."""
        if attempt >= self.retries:
            return None
        if r is not None:
            if r.status_code not in (RETRY_STATUS if keyed else RETRY_STATUS_UNKEYED):
                return None
        elif not (keyed or isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))):
            return None  # an unkeyed request may have run: do not run it again behind the caller's back
        wait = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
        if r is not None and r.headers.get("retry-after", "").strip().isdigit():
            wait = min(self.max_backoff, float(r.headers["retry-after"]))
        if end is not None and time.monotonic() + wait >= end:
            return None
        return wait

    def _attempt_timeout(self, end: float | None) -> Any:
        if end is None:
            return self.timeout
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"deadline of {self.deadline} s spent")
        return left if self.timeout is None else min(self.timeout, left)

    def _settle(self, r: httpx.Response | None, error: BaseException | None, end: float | None, attempt: int) -> Any:
        """The last attempt's answer, or its error (TimeoutError once the call's deadline is spent)."""
        if error is None:
            return self._check(r)
        if end is not None and time.monotonic() >= end - 0.05 and isinstance(error, httpx.TimeoutException):
            raise TimeoutError(f"no answer within the deadline of {self.deadline} s "
                               f"({attempt + 1} attempts)") from error
        raise error

    def _headers(self, key: str | None) -> dict:
        return {HEADER: key} if key is not None else {}

    def _post(self, path: str, body: dict, key: str | None = None) -> Any:
        end = None if self.deadline is None else time.monotonic() + self.deadline
        attempt = 0
        while True:
            self.attempts += 1
            r = error = None
            try:
                r = self._client().post(path, json=body, headers=self._headers(key), timeout=self._attempt_timeout(end))
            except httpx.TransportError as e:
                error = e
            wait = self._retry_after(attempt, error, r, key is not None, end)
            if wait is None:
                return self._settle(r, error, end, attempt)
            time.sleep(wait)
            attempt += 1

    async def _apost(self, path: str, body: dict, key: str | None = None) -> Any:
        end = None if self.deadline is None else time.monotonic() + self.deadline
        attempt = 0
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, headers=self._auth) as c:
            while True:
                self.attempts += 1
                r = error = None
                try:
                    r = await c.post(path, json=body, headers=self._headers(key), timeout=self._attempt_timeout(end))
                except httpx.TransportError as e:
                    error = e
                wait = self._retry_after(attempt, error, r, key is not None, end)
                if wait is None:
                    return self._settle(r, error, end, attempt)
                await asyncio.sleep(wait)
                attempt += 1

    def _get(self, path: str) -> httpx.Response:
        r = self._client().get(path, timeout=self.timeout)
        if r.status_code >= 400:
            self._check(r)
        return r

    # ------------------------------------------------------------------------------- judge
    @staticmethod
    def _compare_body(items: Sequence[Any], votes: int | None, errors: str, timeout: float | None) -> dict:
        return {"items": [list(x) for x in items], "votes": votes, "errors": errors, "timeout": timeout}

    @staticmethod
    def _rank_body(items: Sequence[Any], method: str, votes: int | None, errors: str, timeout: float | None) -> dict:
        return {"items": [[q, list(c)] for q, c in items], "method": method, "votes": votes, "errors": errors,
                "timeout": timeout}

    def compare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None,
                      errors: Literal["raise", "return"] = "raise", progress: bool = False,
                      timeout: float | None = None, idempotency_key: str | None = None) -> list[Comparison]:
        out = self._post("/v1/judge/compare", self._compare_body(items, votes, errors, timeout), _key(idempotency_key))
        return [comparison_from_dict(d) for d in out["results"]]

    async def acompare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None,
                             errors: Literal["raise", "return"] = "raise", progress: bool = False,
                             timeout: float | None = None, idempotency_key: str | None = None) -> list[Comparison]:
        out = await self._apost("/v1/judge/compare", self._compare_body(items, votes, errors, timeout),
                                _key(idempotency_key))
        return [comparison_from_dict(d) for d in out["results"]]

    def rank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: str = "knockout",
                   votes: int | None = None, errors: Literal["raise", "return"] = "raise",
                   progress: bool = False, timeout: float | None = None,
                   idempotency_key: str | None = None) -> list[Ranking]:
        out = self._post("/v1/judge/rank", self._rank_body(items, method, votes, errors, timeout),
                         _key(idempotency_key))
        return [ranking_from_dict(d) for d in out["results"]]

    async def arank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: str = "knockout",
                          votes: int | None = None, errors: Literal["raise", "return"] = "raise",
                          progress: bool = False, timeout: float | None = None,
                          idempotency_key: str | None = None) -> list[Ranking]:
        out = await self._apost("/v1/judge/rank", self._rank_body(items, method, votes, errors, timeout),
                                _key(idempotency_key))
        return [ranking_from_dict(d) for d in out["results"]]

    def compare(self, query: str, a: str, b: str, votes: int | None = None) -> Comparison:
        return _raise_failed(self.compare_batch([(query, a, b)], votes=votes)[0])

    async def acompare(self, query: str, a: str, b: str, votes: int | None = None) -> Comparison:
        return _raise_failed((await self.acompare_batch([(query, a, b)], votes=votes))[0])

    def rank(self, query: str, candidates: Sequence[str], method: str = "knockout", votes: int | None = None) -> Ranking:
        return _raise_failed(self.rank_batch([(query, candidates)], method=method, votes=votes)[0])

    async def arank(self, query: str, candidates: Sequence[str], method: str = "knockout",
                    votes: int | None = None) -> Ranking:
        return _raise_failed((await self.arank_batch([(query, candidates)], method=method, votes=votes))[0])

    # ---------------------------------------------------------------------- group rendezvous
    @staticmethod
    def _group_body(group: str, rank: int, world: int, items: Sequence[tuple[str, str]], method: str,
                    votes: int | None, timeout: float | None, wait: float | None) -> dict:
        return {"group": group, "rank": rank, "world": world, "items": [list(x) for x in items], "method": method,
                "votes": votes, "timeout": timeout, "wait": wait}

    @staticmethod
    def _group_answer(out: dict) -> GroupPart:
        return GroupPart([ranking_from_dict(d) for d in out["results"]],
                         [None if p is None else (p[0], p[1]) for p in out["positions"]], out["stats"])

    def rank_group(self, group: str, rank: int, world: int, items: Sequence[tuple[str, str]],
                   method: str = "knockout", votes: int | None = None, timeout: float | None = None,
                   wait: float | None = None) -> GroupPart:
        """This rank's part of one batch ranked by prompt over all `world` ranks' slices (/v1/judge/group):
        every rank posts its (query, completion) pairs under the same `group` key and waits up to `wait`
        seconds (the server's default if None) for the others. A retry of the same slice joins (the key
        and rank are its idempotency key); TimeoutError names the ranks that never posted."""
        return self._group_answer(self._post("/v1/judge/group", self._group_body(
            group, rank, world, items, method, votes, timeout, wait), f"{group}:{rank}"))

    async def arank_group(self, group: str, rank: int, world: int, items: Sequence[tuple[str, str]],
                          method: str = "knockout", votes: int | None = None, timeout: float | None = None,
                          wait: float | None = None) -> GroupPart:
        return self._group_answer(await self._apost("/v1/judge/group", self._group_body(
            group, rank, world, items, method, votes, timeout, wait), f"{group}:{rank}"))

    # ------------------------------------------------------------------- OpenAI, OpenRLHF
    def completions(self, **body: Any) -> dict:
        return self._post("/v1/completions", body)

    async def acompletions(self, **body: Any) -> dict:
        return await self._apost("/v1/completions", body)

    def chat(self, **body: Any) -> dict:
        return self._post("/v1/chat/completions", body)

    async def achat(self, **body: Any) -> dict:
        return await self._apost("/v1/chat/completions", body)

    def openrlhf_rewards(self, query: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None,
                         idempotency_key: str | None = None) -> dict:
        return self._post("/get_reward", {"query": list(query), "prompts": list(prompts),
                                          "labels": None if labels is None else list(labels)}, _key(idempotency_key))

    def health(self) -> dict:
        return self._get("/health").json()

    def models(self) -> dict:
        return self._get("/v1/models").json()

    def close(self) -> None:
        c = getattr(self._local, "client", None)
        if c is not None:
            c.close()
            self._local.client = None


def _key(given: str | None) -> str:
    """The idempotency key of one judgment: the caller's, else a new one (its retries reuse it)."""
    return given if given is not None else uuid.uuid4().hex


def _raise_failed(x: Any) -> Any:
    if x.error is not None:
        raise RuntimeError(x.error)
    return x
