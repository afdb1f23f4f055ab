"""A small client of `python -m rrm_engine serve` (httpx), synchronous and asynchronous.

JudgeClient has the Judge's batch API (compare_batch / rank_batch and their a- forms, compare, rank),
returning the same Comparison / Ranking objects, so every adapter (TRL, verl) takes it in place of an
in-process Judge: many trainer processes then share one server and its engine. It also speaks the
OpenAI routes (completions, chat) and OpenRLHF's reward shape.

A 4xx answer raises ValueError with the server's message (the field it names included); other
failures raise RuntimeError / httpx errors. The sync methods are safe from several threads (one
httpx.Client per thread); the async ones open a client per call, so they work from any event loop.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Literal, Sequence

import httpx

from ..judge.results import Comparison, Ranking, comparison_from_dict, ranking_from_dict


class JudgeClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float | None = 600.0,
                 api_key: str | None = None):
        """api_key: sent as `Authorization: Bearer <key>` (serve --api-key); default $RRM_API_KEY."""
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get("RRM_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._local = threading.local()

    # --------------------------------------------------------------------------- transport
    def _client(self) -> httpx.Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self._headers)
        return c

    @staticmethod
    def _check(r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                err = r.json().get("error", {})
                msg = err.get("message") or r.text
            except ValueError:
                msg = r.text
            if 400 <= r.status_code < 500:
                raise ValueError(f"{r.status_code}: {msg}")
            raise RuntimeError(f"server error {r.status_code}: {msg}")
        return r.json()

    def _post(self, path: str, body: dict) -> Any:
        return self._check(self._client().post(path, json=body))

    async def _apost(self, path: str, body: dict) -> Any:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, headers=self._headers) as c:
            return self._check(await c.post(path, json=body))

    def _get(self, path: str) -> httpx.Response:
        r = self._client().get(path)
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
                      timeout: float | None = None) -> list[Comparison]:
        out = self._post("/v1/judge/compare", self._compare_body(items, votes, errors, timeout))
        return [comparison_from_dict(d) for d in out["results"]]

    async def acompare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None,
                             errors: Literal["raise", "return"] = "raise", progress: bool = False,
                             timeout: float | None = None) -> list[Comparison]:
        out = await self._apost("/v1/judge/compare", self._compare_body(items, votes, errors, timeout))
        return [comparison_from_dict(d) for d in out["results"]]

    def rank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: str = "knockout",
                   votes: int | None = None, errors: Literal["raise", "return"] = "raise",
                   progress: bool = False, timeout: float | None = None) -> list[Ranking]:
        out = self._post("/v1/judge/rank", self._rank_body(items, method, votes, errors, timeout))
        return [ranking_from_dict(d) for d in out["results"]]

    async def arank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: str = "knockout",
                          votes: int | None = None, errors: Literal["raise", "return"] = "raise",
                          progress: bool = False, timeout: float | None = None) -> list[Ranking]:
        out = await self._apost("/v1/judge/rank", self._rank_body(items, method, votes, errors, timeout))
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

    # ------------------------------------------------------------------- OpenAI, OpenRLHF
    def completions(self, **body: Any) -> dict:
        return self._post("/v1/completions", body)

    async def acompletions(self, **body: Any) -> dict:
        return await self._apost("/v1/completions", body)

    def chat(self, **body: Any) -> dict:
        return self._post("/v1/chat/completions", body)

    async def achat(self, **body: Any) -> dict:
        return await self._apost("/v1/chat/completions", body)

    def openrlhf_rewards(self, query: Sequence[str], prompts: Sequence[str],
                         labels: Sequence[str | None] | None = None) -> dict:
        return self._post("/get_reward", {"query": list(query), "prompts": list(prompts),
                                          "labels": None if labels is None else list(labels)})

    def health(self) -> dict:
        return self._get("/health").json()

    def models(self) -> dict:
        return self._get("/v1/models").json()

    def metrics_text(self) -> str:
        return self._get("/metrics").text

    def close(self) -> None:
        c = getattr(self._local, "client", None)
        if c is not None:
            c.close()
            self._local.client = None


def _raise_failed(x: Any) -> Any:
    if x.error is not None:
        raise RuntimeError(x.error)
    return x
