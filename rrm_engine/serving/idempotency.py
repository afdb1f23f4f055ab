"""Keyed judgments: a retry joins the judgment already running instead of starting it again.

Training loops retry a reward request when their HTTP client gives up (OpenRLHF after 180 s, five
times; verl's reward loop and JudgeClient on connection errors, 5xx and 429). Without a key each
retry starts the judgment from scratch, and the disconnect of the attempt before aborted the one that
was nearly done. With a key:

  * a request whose key is running joins it (awaits the same result; nothing runs twice);
  * a finished result is kept for `ttl` seconds, so a retry that arrives just after completion gets it;
  * a client that disconnects does not cancel a keyed judgment at once: it runs on for `grace` seconds
    with nobody waiting, and is cancelled (its engine requests aborted) only if no retry joined by then;
  * a judgment that failed (an exception, a cancellation) is not kept: the retry runs it again;
  * a key reused with a different request body is refused (KeyConflict, 409): never someone else's result.

Keys come from the `Idempotency-Key` header or the body's `idempotency_key` field; OpenRLHF's client sends
neither, so /get_reward uses the hash of its body (two identical bodies within `ttl` share one judgment).
Keys are namespaced by route. Counters: `started` (judgments actually run), `joined` (requests that joined
a running one), `replayed` (requests answered from a finished one), `abandoned` (cancelled after the grace).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from .openai_api import BadField

HEADER = "Idempotency-Key"


class KeyConflict(ValueError):
    """The key was used for a different request body."""

    def __init__(self, key: str):
        super().__init__(f"{HEADER} {key!r} was already used for a different request body; use a new key per "
                         f"judgment and the same key only to retry the same body")
        self.key = key


def fingerprint(route: str, body: Any) -> str:
    """A stable hash of a parsed request body (key order and JSON spacing do not matter)."""
    text = json.dumps([route, body], sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Entry:
    task: asyncio.Future
    fingerprint: str
    waiters: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class Judgments:
    """The registry of keyed judgments of one server (one event loop)."""

    def __init__(self, ttl: float = 300.0, grace: float = 60.0, max_finished: int = 4096):
        if ttl < 0 or grace < 0 or max_finished < 0:
            raise ValueError(f"ttl ({ttl}), grace ({grace}) and max_finished ({max_finished}) must be >= 0")
        self.ttl, self.grace, self.max_finished = float(ttl), float(grace), int(max_finished)
        self._entries: dict[str, _Entry] = {}
        self.counts = {"started": 0, "joined": 0, "replayed": 0, "abandoned": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def running(self) -> int:
        return sum(1 for e in self._entries.values() if not e.task.done())

    def work(self, headers: Mapping[str, str], route: str, body: dict, make: Callable[[], Awaitable[Any]],
             by_hash: bool = False) -> Awaitable[Any]:
        """The judgment of one request as an awaitable for the server's watch(): keyed (header, body field,
        or with `by_hash` the body's hash) it joins / survives a disconnect; unkeyed it is make() itself
        (cancelled with its client)."""
        key = headers.get(HEADER) or body.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not key.strip() or len(key) > 255):
            raise BadField("idempotency_key", f"an idempotency key is a non-empty string of at most 255 characters, "
                                              f"got {key!r}")
        fp = fingerprint(route, body)
        if key is None and by_hash:
            key = "sha256:" + fp
        if key is None:
            self.counts["started"] += 1
            return make()
        return self.run(f"{route}:{key}", fp, make)

    async def run(self, key: str, fp: str, make: Callable[[], Awaitable[Any]]) -> Any:
        """The result of the judgment `key`: started with make() if it is not running or kept, else
        joined. Cancelling this coroutine (its client went away) leaves the judgment running for the
        grace period."""
        e = self._acquire(key, fp, make)
        try:
            return await asyncio.shield(e.task)
        finally:
            self._release(key, e)

    # ------------------------------------------------------------------------------ internals
    def _acquire(self, key: str, fp: str, make: Callable[[], Awaitable[Any]]) -> _Entry:
        e = self._entries.get(key)
        if e is not None and e.fingerprint != fp:
            raise KeyConflict(key)
        if e is not None and e.task.done() and (e.task.cancelled() or e.task.exception() is not None):
            self._drop(key, e)  # failed just now (its done callback has not run yet): run it again
            e = None
        if e is None:
            e = _Entry(asyncio.ensure_future(make()), fp)
            self._entries[key] = e
            self.counts["started"] += 1
            e.task.add_done_callback(lambda _t, key=key, e=e: self._finished(key, e))
        else:
            self.counts["replayed" if e.task.done() else "joined"] += 1
        e.waiters += 1
        if e.timer is not None and not e.task.done():  # a retry arrived within the grace period
            e.timer.cancel()
            e.timer = None
        return e

    def _release(self, key: str, e: _Entry) -> None:
        e.waiters -= 1
        if e.waiters == 0 and not e.task.done():
            # nobody waits (the client went away): give a retry `grace` seconds to join
            e.timer = asyncio.get_running_loop().call_later(self.grace, self._abandon, key, e)

    def _abandon(self, key: str, e: _Entry) -> None:
        if e.waiters == 0 and not e.task.done():
            self.counts["abandoned"] += 1
            self._drop(key, e)
            e.task.cancel()  # aborts its engine requests
            e.task.add_done_callback(_consume)

    def _finished(self, key: str, e: _Entry) -> None:
        if e.timer is not None:
            e.timer.cancel()
            e.timer = None
        if e.task.cancelled() or e.task.exception() is not None:
            self._drop(key, e)  # a failure is not replayed: the retry runs the judgment again
            return
        e.timer = asyncio.get_running_loop().call_later(self.ttl, self._drop, key, e)
        finished = [k for k, x in self._entries.items() if x.task.done()]
        for k in finished[: max(0, len(finished) - self.max_finished)]:  # oldest first (insertion order)
            self._drop(k, self._entries[k])

    def _drop(self, key: str, e: _Entry) -> None:
        if self._entries.get(key) is e:
            del self._entries[key]
            if e.timer is not None:
                e.timer.cancel()
                e.timer = None

    # ------------------------------------------------------------------------------ metrics
    # a prometheus_client collector (registered by serving/prometheus.py's ServerMetrics)
    def describe(self) -> list:
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        helps = {"started": "Judgments run by the judge routes (each once, however often it was retried).",
                 "joined": "Requests that joined a judgment already running under the same idempotency key.",
                 "replayed": "Requests answered from a finished judgment kept under the same idempotency key.",
                 "abandoned": "Keyed judgments cancelled after their client went away and no retry joined."}
        for k, h in helps.items():
            yield CounterMetricFamily(f"rrm_judgments_{k}", h, value=float(self.counts[k]))
        yield GaugeMetricFamily("rrm_judgments_running", "Keyed judgments running now.", value=float(self.running()))


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
