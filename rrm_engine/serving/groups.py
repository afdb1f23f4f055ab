"""Group rendezvous: trainer ranks that each hold a slice of one batch meet on the server, which ranks
the whole batch's groups once and answers each rank its part (POST /v1/judge/group).

Why on the server: TRL hands every process a slice of the batch, and a GRPO group (one prompt's
completions) can span processes. Gathering the slices with torch.distributed object collectives from a
worker thread is reported to hang under NCCL (pytorch/pytorch#115861, #68973), and a new thread does
not inherit the current CUDA device. Ranks that already share one judge server need no collective at
all: each posts its slice under a key that every rank derives alike (the TRL adapter's run, reward
function, step and call), and waits.

A rendezvous (one key) expects `world` slices, one per rank. When the last one is in, `rank_all` runs
once over the slices in rank order, and every waiting rank gets the same result; the route cuts out
each rank's part. Rules:
  * a retry of a slice (same key and rank, same content) joins: it is counted once, and after the
    ranking it is answered from the kept result (for `ttl` seconds);
  * the same key and rank with other content is a conflict (409, field "items"); a slice whose
    world / method / votes / timeout differ from the first slice's is refused (400 naming the field);
  * a rank whose group is not complete within its `wait` gets GroupTimeout (408) naming the ranks
    that never posted; its slice stays, so a retry (or the late rank) still completes the group.
    `wait` bounds the rendezvous only; the ranking itself is bounded by the request's `timeout`;
  * at most `max_open` keys are held (finished ones are dropped first, oldest first); beyond that
    a new key is refused with Overloaded (429); an incomplete rendezvous is dropped `ttl` seconds after
    its latest slice (a rank's `wait` may not exceed `ttl`: 400 "wait");
  * a ranking that fails (an exception, the engine died, admission refused it) is not kept: every
    waiting rank gets the error and a retry of every rank starts the rendezvous again.
Counters (on /metrics): rrm_groups_ranked_total (rankings run), _slices_total (slices received, retries
not counted), _joined_total (retries that joined), _timeouts_total, and the gauge rrm_groups_open.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .limits import BadField, Overloaded

# the parameters every slice of one rendezvous must agree on
AGREED = ("world", "method", "votes", "timeout")


class GroupTimeout(Exception):
    """Not every rank posted its slice within the waiting rank's `wait`."""

    def __init__(self, key: str, world: int, missing: list[int], waited: float):
        self.key, self.world, self.missing, self.waited = key, world, missing, waited
        super().__init__(f"group {key!r}: rank(s) {missing} of {world} never posted their slice "
                         f"(got {world - len(missing)} of {world}) within {waited:g} s")


class SliceConflict(ValueError):
    """The same key and rank were posted again with other content."""

    def __init__(self, key: str, rank: int):
        self.field = "items"
        super().__init__(f"group {key!r}: rank {rank} already posted a different slice under this key; a retry must "
                         f"send the same items, and a new batch needs a new group key")


@dataclass
class _Rendezvous:
    params: dict[str, Any]
    slices: dict[int, tuple[str, Any]] = field(default_factory=dict)  # rank -> (fingerprint, slice)
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    complete: asyncio.Event = field(default_factory=asyncio.Event)  # every slice is in
    task: asyncio.Future | None = None  # the ranking (held here: the loop keeps only weak references)
    timer: asyncio.TimerHandle | None = None


class Groups:
    """The rendezvous of one server (one event loop)."""

    def __init__(self, max_open: int = 1024, ttl: float = 600.0, default_wait: float = 300.0):
        if max_open < 1 or ttl <= 0 or default_wait <= 0:
            raise ValueError(f"max_open ({max_open}) must be >= 1, ttl ({ttl}) and default_wait ({default_wait}) > 0")
        self.max_open, self.ttl, self.default_wait = int(max_open), float(ttl), float(default_wait)
        self._open: dict[str, _Rendezvous] = {}
        self.counts = {"ranked": 0, "slices": 0, "joined": 0, "timeouts": 0}

    def __len__(self) -> int:
        return len(self._open)

    async def join(self, key: str, rank: int, params: dict[str, Any], fingerprint: str, part: Any,
                   rank_all: Callable[[list[Any]], Awaitable[Any]], wait: float | None = None) -> Any:
        """The result of rank_all(slices in rank order), once all params["world"] slices of `key` are in."""
        world = params["world"]
        if not 0 <= rank < world:
            raise BadField("rank", f"rank must be in [0, world={world}), got {rank}")
        wait = self.default_wait if wait is None else wait
        if wait > self.ttl:
            raise BadField("wait", f"wait ({wait:g} s) is longer than this server keeps an open group ({self.ttl:g} s)")
        r = self._open.get(key)
        if r is None:
            r = self._new(key, params)
        for name in AGREED:
            if r.params[name] != params[name]:
                raise BadField(name, f"group {key!r}: rank {rank} sent {name}={params[name]!r}, but the group was "
                                     f"opened with {name}={r.params[name]!r} (every rank's slice must agree)")
        if rank in r.slices:
            if r.slices[rank][0] != fingerprint:
                raise SliceConflict(key, rank)
            self.counts["joined"] += 1
        else:
            r.slices[rank] = (fingerprint, part)
            self.counts["slices"] += 1
            if len(r.slices) == world:
                self._start(key, r, rank_all)
            else:  # an open rendezvous lives `ttl` seconds after its latest slice, longer than any wait
                self._expire_later(key, r)
        try:  # `wait` bounds the rendezvous only: a long ranking is bounded by the judge's own timeout
            await asyncio.wait_for(r.complete.wait(), timeout=wait)
        except asyncio.TimeoutError:
            self.counts["timeouts"] += 1
            raise GroupTimeout(key, world, sorted(set(range(world)) - set(r.slices)), wait) from None
        # shielded: a rank that disconnects leaves the ranking running for the others
        return await asyncio.shield(r.result)

    # ------------------------------------------------------------------------------ internals
    def _new(self, key: str, params: dict[str, Any]) -> _Rendezvous:
        if len(self._open) >= self.max_open:
            for k in [k for k, x in self._open.items() if x.result.done()]:  # oldest first (insertion order)
                self._drop(k)
                if len(self._open) < self.max_open:
                    break
        if len(self._open) >= self.max_open:
            raise Overloaded(f"{len(self._open)} groups are waiting for their slices (the most this server holds); "
                             f"retry later", retry_after=1)
        r = self._open[key] = _Rendezvous(dict(params))
        return r

    def _expire_later(self, key: str, r: _Rendezvous) -> None:
        if r.timer is not None:
            r.timer.cancel()
        r.timer = asyncio.get_running_loop().call_later(self.ttl, self._expire, key, r)

    def _start(self, key: str, r: _Rendezvous, rank_all: Callable[[list[Any]], Awaitable[Any]]) -> None:
        self.counts["ranked"] += 1
        r.complete.set()
        if r.timer is not None:  # complete: no longer expires (a ranking may take longer than ttl)
            r.timer.cancel()
            r.timer = None
        task = r.task = asyncio.ensure_future(rank_all([r.slices[n][1] for n in range(len(r.slices))]))

        def settle(t: asyncio.Future) -> None:
            error = RuntimeError(f"group {key!r}: its ranking was cancelled") if t.cancelled() else t.exception()
            if error is not None:
                r.result.set_exception(error)
                r.result.exception()  # retrieved: ranks that gave up waiting leave nobody to raise it to
                self._drop(key, r)  # a failure is not kept: the ranks' retries start the group again
                return
            r.result.set_result(t.result())
            # kept for retries of a slice that missed the answer
            r.timer = asyncio.get_running_loop().call_later(self.ttl, self._drop, key, r)

        task.add_done_callback(settle)

    def _expire(self, key: str, r: _Rendezvous) -> None:
        if not r.complete.is_set():
            self._drop(key, r)

    def _drop(self, key: str, r: _Rendezvous | None = None) -> None:
        r = self._open.get(key) if r is None else r
        if r is not None and self._open.get(key) is r:
            del self._open[key]
            if r.timer is not None:
                r.timer.cancel()
                r.timer = None

    # ------------------------------------------------------------------------------ metrics
    # a prometheus_client collector (registered on the server's registry by routes/judge.py)
    def describe(self) -> list:
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        helps = {"ranked": "Group rendezvous ranked (each once, whatever the number of ranks and retries).",
                 "slices": "Slices received by /v1/judge/group (a retry of a slice is not counted again).",
                 "joined": "Retries of a slice that joined its group instead of counting twice.",
                 "timeouts": "Ranks answered 408 because their group did not complete in time."}
        for k, h in helps.items():
            yield CounterMetricFamily(f"rrm_groups_{k}", h, value=float(self.counts[k]))
        yield GaugeMetricFamily("rrm_groups_open", "Group rendezvous held (waiting or kept for retries).",
                                value=float(len(self._open)))
