"""JudgePool: engine replicas on Ray, and the routing in front of them. One implementation serves both
the Python scorer API (compare_batch / rank_batch, and their async forms) and `rrm-engine serve
--data-parallel-size N` (the HTTP front holds a JudgePool as its judge; `pool.engine` is its
completions backend).

A replica is one Ray actor (`ReplicaActor`; its worker shows as `ray::ReplicaActor...` in ps) that
holds an LLM, the AsyncLLM over it and a Judge. It is an async actor: every call it takes joins the
one engine batch. Its resources are reserved by a placement group of one bundle ({CPU: num_cpus,
GPU: tensor_parallel_size} with GPUs), so the M GPUs of an M-way tensor-parallel replica are on one
node; inside the actor, LLM(tensor_parallel_size=M) spawns its ranks as it does in any process.

Routing keeps the prefix sharing one engine has (the judge's prefix structure is known exactly):
  - all items of one query in a batch (every vote and both presentation orders of a comparison,
    every match of a ranking) go to one replica in one call;
  - a query seen before goes to the replica it went to (a sticky map of query hash -> replica, LRU
    bounded), where its system prompt + query prefix is in the radix cache;
  - a new query goes to the least loaded live replica: work this front has in flight there
    (votes x items), then KV use as of the last metrics read;
  - a completion request (any n) is one request on one replica, the least loaded.

Faults: a replica that dies (RayActorError / ActorDiedError: process killed, OOM) has the calls it
held sent again to the live replicas (votes are seeded by item content, judge.py, so an item gets
the same votes wherever it runs), and a replacement is started in the background while restarts
remain. Results are accepted once per item (a second answer is ignored and counted). A streamed
completion is resubmitted only if none of its tokens has been sent yet. `health()` says "degraded"
while fewer replicas live than were asked for. A replica that cannot start at construction fails
the constructor with its error. Ray is optional (`pip install 'rrm_engine[ray]'`) and imported
only when a pool is built.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Literal, Sequence

from ..async_engine import EngineDeadError
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .background_loop import background_loop, run_sync
from .judge import Judge
from .results import Comparison, Ranking
from ..async_engine.tasks import all_or_none

STICKY_QUERIES = 100_000  # queries remembered by the router (least recently used dropped)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError("JudgePool needs Ray: pip install 'rrm_engine[ray]' (or pip install 'ray>=2.9')") from e
    return ray


@dataclass
class PoolStats:
    calls: int = 0  # calls sent to replicas (resubmissions included)
    replicas_died: int = 0
    replicas_started: int = 0  # replacements started after a death (not the initial ones)
    resubmitted_items: int = 0  # items (and completion requests) of calls lost with a replica, sent again
    duplicates_ignored: int = 0  # answers for items that already had one


@dataclass
class _Replica:
    id: int  # the replica's slot, 0..N-1 (its metrics label); a replacement takes the dead one's slot
    handle: Any
    placement_group: Any
    generation: int = 0  # how many replicas have held this slot before
    alive: bool = True
    load: int = 0  # work this front has in flight there (votes x items; samples for completions)
    kv_use: float = 0.0  # as of the last metrics read
    pid: int | None = None


@dataclass
class _Group:
    key: str  # the query's hash
    indices: list[int]
    load: int


class ReplicaActor:
    """One engine replica (wrapped with ray.remote by the pool; async methods make it an async
    actor, so concurrent calls share its engine batch)."""

    def __init__(self, model: str, llm_kwargs: dict, judge_kwargs: dict):
        self.args = (model, llm_kwargs, judge_kwargs)
        self.judge: Judge | None = None

    def start(self) -> dict:
        import os

        from ..llm import LLM
        model, llm_kwargs, judge_kwargs = self.args
        self.judge = Judge(LLM(model, **llm_kwargs), **judge_kwargs)
        engine = self.judge.engine  # the AsyncLLM (started now, not on the first request)
        core = getattr(self.judge.llm, "engine", None)
        pool = getattr(core, "pool", None)
        return {"pid": os.getpid(), "max_model_len": getattr(core, "max_model_len", None),
                "vocab_size": getattr(core, "vocab_size", None),
                "pool_tokens": pool.num_blocks * pool.block_size if pool is not None else None,
                "votes": self.judge.votes, "max_tokens": self.judge.max_tokens,
                "has_tokenizer": engine.tokenizer is not None}

    def tokenizer(self) -> Any:
        return self.judge.engine.tokenizer

    async def compare(self, items: list[tuple], votes: int | None, errors: str,
                      timeout: float | None) -> list[Comparison]:
        return await self.judge.acompare_batch(items, votes=votes, errors=errors, timeout=timeout)

    async def rank(self, items: list[tuple], method: str, votes: int | None, errors: str,
                   timeout: float | None) -> list[Ranking]:
        return await self.judge.arank_batch(items, method=method, votes=votes, errors=errors, timeout=timeout)

    async def generate(self, ids: list[int], params: SamplingParams, request_id: str) -> RequestOutput:
        return await self.judge.engine.generate(ids, params, request_id=request_id)

    async def stream(self, ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        s = self.judge.engine.stream(ids, params, request_id=request_id)
        try:
            async for out in s:
                yield out
        finally:
            s.close()

    def abort(self, request_id: str) -> None:
        self.judge.engine.abort(request_id)

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        self.judge.check_prompt(ids, params)

    def metrics(self) -> dict:
        return self.judge.engine.metrics()

    def reset_metrics(self) -> None:
        self.judge.engine.reset_metrics()


def _key(query: str) -> str:
    return hashlib.sha1(query.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class JudgePool:
    def __init__(self, model: str = "embedded", num_replicas: int = 2, llm_kwargs: dict | None = None,
                 judge_kwargs: dict | None = None, tensor_parallel_size: int = 1, ray_address: str | None = None,
                 use_gpu: bool | None = None, num_cpus: float = 1.0, max_restarts: int | None = None,
                 start_timeout: float = 600.0):
        """num_replicas engine replicas of `model`, each tensor_parallel_size-way tensor parallel
        (LLM(tensor_parallel_size=...) inside the replica). ray_address: an existing cluster (else
        $RAY_ADDRESS, else a local Ray started here). use_gpu: None = when the cluster has GPUs
        (each replica then reserves tensor_parallel_size of them). num_cpus: CPUs a replica reserves.
        max_restarts: replacements started after deaths over the pool's life (default num_replicas).
        A replica that cannot start within start_timeout seconds, or fails, is a RuntimeError here."""
        for name, v in (("num_replicas", num_replicas), ("tensor_parallel_size", tensor_parallel_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(num_cpus, (int, float)) or isinstance(num_cpus, bool) or num_cpus <= 0:
            raise ValueError(f"num_cpus must be a number > 0, got {num_cpus!r}")
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=ray_address)
        self._ray = ray
        self.model, self.num_replicas, self.tensor_parallel_size = model, num_replicas, tensor_parallel_size
        self.llm_kwargs = dict(llm_kwargs or {})
        if tensor_parallel_size > 1:
            self.llm_kwargs["tensor_parallel_size"] = tensor_parallel_size
        self.judge_kwargs = dict(judge_kwargs or {})
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        self.use_gpu, self.num_cpus = use_gpu, float(num_cpus)
        self.restarts_left = num_replicas if max_restarts is None else max_restarts
        self.start_timeout = start_timeout
        self.stats = PoolStats()
        self.errors: list[str] = []  # why replicas died or could not be restarted (latest last)
        # called after each call is sent with (replica id, item indices): monitoring, and the tests'
        # way to kill a replica while it holds work
        self.on_dispatch: Callable[[int, list[int]], None] | None = None
        self._lock = threading.Lock()  # routing state: the server's loop and the judge's loop both route
        self._sticky: OrderedDict[str, int] = OrderedDict()
        self._rids = itertools.count()
        self._restarting = 0
        self._closed = False
        self._cls = ray.remote(ReplicaActor)
        slots = [self._spawn(i) for i in range(num_replicas)]
        try:
            infos = ray.get([h.start.remote() for h, _ in slots], timeout=start_timeout)
            self.tokenizer = ray.get(slots[0][0].tokenizer.remote(), timeout=start_timeout)
        except Exception as e:
            for h, pg in slots:
                self._kill(h, pg)
            raise RuntimeError(f"JudgePool: a replica of {model!r} failed to start: {e}") from e
        self.replicas = [_Replica(i, h, pg, pid=info["pid"]) for i, ((h, pg), info) in enumerate(zip(slots, infos))]
        self.info = infos[0]
        self.votes, self.max_tokens = self.info["votes"], self.info["max_tokens"]
        self.engine = PoolEngine(self)

    # -- replicas ----------------------------------------------------------------------------------
    def _spawn(self, slot: int) -> tuple[Any, Any]:
        """A new actor in a placement group of its own (not started: .start() loads the model)."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        ray = self._ray
        gpus = self.tensor_parallel_size if self.use_gpu else 0
        bundle = {"CPU": self.num_cpus, **({"GPU": gpus} if gpus else {})}
        pg = placement_group([bundle], strategy="STRICT_PACK", name="")
        try:
            ray.get(pg.ready(), timeout=self.start_timeout)
        except Exception as e:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(pg)
            raise RuntimeError(f"JudgePool: no node can reserve {bundle} for replica {slot} within "
                               f"{self.start_timeout:g} s (cluster: {ray.cluster_resources()})") from e
        handle = self._cls.options(
            num_cpus=self.num_cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0,  # the pool retries
            max_concurrency=1000, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote(self.model, self.llm_kwargs, self.judge_kwargs)
        return handle, pg

    def _kill(self, handle: Any, pg: Any) -> None:
        try:
            self._ray.kill(handle, no_restart=True)
        except Exception:  # already gone
            pass
        if pg is not None:
            from ray.util.placement_group import remove_placement_group
            try:
                remove_placement_group(pg)
            except Exception:
                pass

    def live(self) -> list[_Replica]:
        with self._lock:
            return [r for r in self.replicas if r.alive]

    def health(self) -> tuple[str, str | None]:
        """("ok", None) with every replica live; ("degraded", why) while some are missing (requests
        still served); ("dead", why) with none live and none starting."""
        live = len(self.live())
        if self._closed:
            return "dead", "the pool is shut down"
        if live == self.num_replicas:
            return "ok", None
        why = f"{live} of {self.num_replicas} replicas live" + (f"; last error: {self.errors[-1]}" if self.errors else "")
        if live == 0 and not self._restarting:
            return "dead", why
        return "degraded", why

    def _died(self, rep: _Replica, error: BaseException) -> None:
        """Mark it dead (once), forget its queries, start a replacement on the judge's loop."""
        with self._lock:
            if not rep.alive:
                return
            rep.alive = False
            self.stats.replicas_died += 1
            self.errors.append(f"replica {rep.id} died: {type(error).__name__}: {str(error)[:300]}")
            for k in [k for k, v in self._sticky.items() if v == rep.id]:
                del self._sticky[k]
            restart = self.restarts_left > 0 and not self._closed
            if restart:
                self.restarts_left -= 1
                self._restarting += 1
        self._kill(rep.handle, rep.placement_group)
        if restart:
            asyncio.run_coroutine_threadsafe(self._restart(rep), background_loop())

    async def _restart(self, dead: _Replica) -> None:
        try:
            handle, pg = await asyncio.to_thread(self._spawn, dead.id)
            try:
                info = await asyncio.wait_for(handle.start.remote(), self.start_timeout)
            except BaseException:
                self._kill(handle, pg)
                raise
            with self._lock:
                if self._closed:
                    self._kill(handle, pg)
                    return
                self.replicas[self.replicas.index(dead)] = _Replica(dead.id, handle, pg, dead.generation + 1,
                                                                    pid=info["pid"])
                self.stats.replicas_started += 1
        except Exception as e:
            with self._lock:
                self.errors.append(f"replica {dead.id} could not be restarted: {type(e).__name__}: {str(e)[:300]}")
        finally:
            with self._lock:
                self._restarting -= 1

    async def _wait_for_live(self) -> None:
        """Until a replica is live; RuntimeError when none is and none is starting."""
        deadline = time.monotonic() + self.start_timeout
        while not self.live():
            with self._lock:
                starting = self._restarting
            if not starting or time.monotonic() > deadline:
                raise RuntimeError(f"JudgePool: every replica is dead and no restart is left "
                                   f"({self.stats.replicas_died} died; {self.errors[-1] if self.errors else ''})")
            await asyncio.sleep(0.05)

    def shutdown(self) -> None:
        """Kill every replica (the Ray cluster itself stays up)."""
        with self._lock:
            self._closed = True
            reps, self.replicas = self.replicas, []
        for rep in reps:
            self._kill(rep.handle, rep.placement_group)

    def __enter__(self) -> "JudgePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- routing -----------------------------------------------------------------------------------
    def _least_loaded(self) -> _Replica:
        return min((r for r in self.replicas if r.alive), key=lambda r: (r.load, r.kv_use, r.id))

    def _assign(self, groups: list[_Group]) -> dict[int, tuple[_Replica, list[_Group]]]:
        """Each query group to the replica that holds its query, else the least loaded (heaviest
        group first, so that one batch of new queries spreads); loads counted as assigned."""
        out: dict[int, tuple[_Replica, list[_Group]]] = {}
        with self._lock:
            by_id = {r.id: r for r in self.replicas if r.alive}
            for g in sorted(groups, key=lambda g: -g.load):
                rep = by_id.get(self._sticky.get(g.key, -1)) or self._least_loaded()
                self._sticky[g.key] = rep.id
                self._sticky.move_to_end(g.key)
                while len(self._sticky) > STICKY_QUERIES:
                    self._sticky.popitem(last=False)
                rep.load += g.load
                out.setdefault(rep.id, (rep, []))[1].append(g)
        return out

    async def _dispatch(self, groups: list[_Group], send: Callable[[Any, list[int]], Any], results: dict) -> None:
        """Run every group on its replica; a replica's death sends its groups to the live ones."""
        pending = groups
        while pending:
            await self._wait_for_live()
            assigned = self._assign(pending)
            outcomes = await all_or_none([self._call(rep, gs, send, results) for rep, gs in assigned.values()])
            pending = [g for lost in outcomes for g in lost]
            self.stats.resubmitted_items += sum(len(g.indices) for g in pending)

    async def _call(self, rep: _Replica, groups: list[_Group], send: Callable[[Any, list[int]], Any],
                    results: dict) -> list[_Group]:
        """One call on one replica; the groups to send again if the replica died under it."""
        idx = [n for g in groups for n in g.indices]
        load = sum(g.load for g in groups)
        try:
            ref = send(rep.handle, idx)
            self.stats.calls += 1
            if self.on_dispatch is not None:
                self.on_dispatch(rep.id, list(idx))
            try:
                out = await ref
            except asyncio.CancelledError:  # the caller went away: stop the work on the replica too
                self._ray.cancel(ref)
                raise
        except Exception as e:
            # the actor gone, or alive with its engine loop dead (EngineDeadError raised in it): both
            # leave a replica that cannot answer; anything else is the caller's error
            if not isinstance(e, self._dead_errors + (EngineDeadError,)):
                raise
            self._died(rep, e)
            return groups
        finally:
            with self._lock:
                rep.load -= load
        for n, res in zip(idx, out):
            if n in results:
                self.stats.duplicates_ignored += 1
            else:
                results[n] = res
        return []

    @property
    def _dead_errors(self) -> tuple[type, ...]:
        import ray.exceptions as rex
        # ActorUnavailableError is newer than the oldest Ray the extra allows (2.9)
        return tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError")
                     if hasattr(rex, n))

    # -- the scorer API ----------------------------------------------------------------------------
    def _groups(self, indices: list[int], queries: list[str], loads: list[int]) -> list[_Group]:
        groups: dict[str, _Group] = {}
        for n, q, w in zip(indices, queries, loads):
            k = _key(q)
            g = groups.setdefault(k, _Group(k, [], 0))
            g.indices.append(n)
            g.load += w
        return list(groups.values())

    async def acompare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None,
                             errors: Literal["raise", "return"] = "raise", progress: bool = False,
                             timeout: float | None = None) -> list[Comparison]:
        """As Judge.acompare_batch, spread over the replicas by query. timeout: per replica call."""
        k = Judge._check_votes(self.votes if votes is None else votes)
        results: dict[int, Comparison] = {}
        valid: list[int] = []
        for n, item in enumerate(items):
            try:
                Judge.validate_pair(item)  # the judge's own rules, before any work
                valid.append(n)
            except ValueError as e:
                if errors == "raise":
                    raise ValueError(f"item {n}: {e}") from None
                results[n] = Comparison(None, [], (0, 0), None, 0, error=f"ValueError: {e}")
        groups = self._groups(valid, [items[n][0] for n in valid], [k] * len(valid))
        await self._dispatch(groups, lambda h, idx: h.compare.remote([tuple(items[n]) for n in idx], votes, errors,
                                                                     timeout), results)
        return [results[n] for n in range(len(items))]

    async def arank_batch(self, items: Sequence[tuple[str, Sequence[str]]],
                          method: Literal["knockout", "elo"] = "knockout", votes: int | None = None,
                          errors: Literal["raise", "return"] = "raise", progress: bool = False,
                          timeout: float | None = None) -> list[Ranking]:
        """As Judge.arank_batch, spread over the replicas by query (a ranking never splits)."""
        k = Judge._check_votes(self.votes if votes is None else votes)
        if method not in ("knockout", "elo"):
            raise ValueError(f"method must be 'knockout' or 'elo', got {method!r}")
        results: dict[int, Ranking] = {}
        valid: list[int] = []
        for n, item in enumerate(items):
            try:
                Judge.validate_rank(item)
                valid.append(n)
            except ValueError as e:
                if errors == "raise":
                    raise ValueError(f"item {n}: {e}") from None
                results[n] = Ranking([], [], [], 0, 0, method, error=f"ValueError: {e}")

        def matches(c: int) -> int:  # comparisons one ranking costs
            return c - 1 if method == "knockout" else c * (c - 1) // 2

        groups = self._groups(valid, [items[n][0] for n in valid], [k * matches(len(items[n][1])) for n in valid])
        await self._dispatch(groups, lambda h, idx: h.rank.remote([(items[n][0], list(items[n][1])) for n in idx],
                                                                  method, votes, errors, timeout), results)
        return [results[n] for n in range(len(items))]

    def compare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None,
                      errors: Literal["raise", "return"] = "raise", progress: bool = False,
                      timeout: float | None = None) -> list[Comparison]:
        return run_sync(self.acompare_batch(items, votes, errors, progress, timeout))

    def rank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: Literal["knockout", "elo"] = "knockout",
                   votes: int | None = None, errors: Literal["raise", "return"] = "raise", progress: bool = False,
                   timeout: float | None = None) -> list[Ranking]:
        return run_sync(self.arank_batch(items, method, votes, errors, progress, timeout))

    def compare(self, query: str, a: str, b: str, votes: int | None = None) -> Comparison:
        out = self.compare_batch([(query, a, b)], votes=votes)[0]
        if out.error is not None:
            raise RuntimeError(out.error)
        return out

    def rank(self, query: str, candidates: Sequence[str], method: Literal["knockout", "elo"] = "knockout",
             votes: int | None = None) -> Ranking:
        out = self.rank_batch([(query, candidates)], method=method, votes=votes)[0]
        if out.error is not None:
            raise RuntimeError(out.error)
        return out

    # -- what a server needs besides the scorer API ------------------------------------------------
    def check_prompt(self, prompt_ids: list[int], params: Any) -> None:
        """The engine's own admission check, asked of a live replica (every replica runs the same model)."""
        rep = self.live()[0] if self.live() else None
        if rep is not None:
            self._ray.get(rep.handle.check_prompt.remote(prompt_ids, params))

    def replica_metrics(self, timeout: float = 5.0) -> dict[int, dict]:
        """{replica slot: its engine's metrics} of the live replicas (a replica that does not answer
        within `timeout` is left out); refreshes the KV use the router reads."""
        reps = self.live()
        refs = [r.handle.metrics.remote() for r in reps]
        out: dict[int, dict] = {}
        for rep, ref in zip(reps, refs):
            try:
                m = self._ray.get(ref, timeout=timeout)
            except Exception:
                continue
            total = m.get("kv_blocks_total") or 0
            rep.kv_use = (m.get("kv_blocks_used", 0) / total) if total else 0.0
            out[rep.id] = m
        return out

    def reset_metrics(self) -> None:
        self._ray.get([r.handle.reset_metrics.remote() for r in self.live()])


def sum_metrics(per_replica: dict[int, dict]) -> dict:
    """The front's totals: every numeric metric summed over the replicas, kv_use recomputed."""
    total: dict[str, float] = {}
    for m in per_replica.values():
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    total.pop("kv_use", None)
    if total.get("kv_blocks_total"):
        total["kv_use"] = total.get("kv_blocks_used", 0) / total["kv_blocks_total"]
    return total


class PoolEngine:
    """The completions backend of a server over a JudgePool: generate / stream / abort / metrics as
    an AsyncLLM has them, each request (all its n samples) on one replica, the least loaded."""

    def __init__(self, pool: JudgePool):
        self.pool = pool
        self.tokenizer = pool.tokenizer
        self._where: dict[str, _Replica] = {}  # request id -> the replica running it (for abort)

    def _pick(self, load: int) -> _Replica:
        with self.pool._lock:
            rep = self.pool._least_loaded()
            rep.load += load
            return rep

    def _done(self, rep: _Replica, load: int, request_id: str) -> None:
        with self.pool._lock:
            rep.load -= load
            if self._where.get(request_id) is rep:
                del self._where[request_id]

    async def generate(self, prompt: list[int], params: SamplingParams, *, request_id: str | None = None
                       ) -> RequestOutput:
        pool = self.pool
        request_id = request_id or f"pool-{next(pool._rids)}"
        while True:
            await pool._wait_for_live()
            rep = self._pick(params.n)
            self._where[request_id] = rep
            ref = rep.handle.generate.remote(list(prompt), params, request_id)
            pool.stats.calls += 1
            try:
                return await ref
            except asyncio.CancelledError:
                pool._ray.cancel(ref)
                raise
            except pool._dead_errors as e:
                pool._died(rep, e)
                pool.stats.resubmitted_items += 1
            finally:
                self._done(rep, params.n, request_id)

    def stream(self, prompt: list[int], params: SamplingParams, *, request_id: str | None = None) -> "_PoolStream":
        return _PoolStream(self, list(prompt), params, request_id or f"pool-{next(self.pool._rids)}")

    def abort(self, request_id: str) -> None:
        rep = self._where.get(request_id)
        if rep is not None and rep.alive:
            rep.handle.abort.remote(request_id)

    def metrics(self) -> dict:
        return sum_metrics(self.pool.replica_metrics())

    def reset_metrics(self) -> None:
        self.pool.reset_metrics()


class _PoolStream:
    """A replica's stream (a Ray streaming generator) as an async iterator with close(); resubmitted
    to another replica if its replica dies before the first item."""

    def __init__(self, engine: PoolEngine, ids: list[int], params: SamplingParams, request_id: str):
        self.engine, self.ids, self.params, self.request_id = engine, ids, params, request_id
        self._gen: Any = None
        self._rep: _Replica | None = None
        self._sent = 0
        self._closed = False
        self._open()

    def _open(self) -> None:
        if not self.engine.pool.live():
            raise RuntimeError("JudgePool: no live replica")
        self._rep = self.engine._pick(self.params.n)
        self.engine._where[self.request_id] = self._rep
        self._gen = self._rep.handle.stream.options(num_returns="streaming").remote(self.ids, self.params,
                                                                                   self.request_id)
        self.engine.pool.stats.calls += 1

    def __aiter__(self) -> "_PoolStream":
        return self

    async def __anext__(self) -> RequestOutput:
        pool = self.engine.pool
        while True:
            try:
                ref = await self._gen.__anext__()
                out = await ref
            except StopAsyncIteration:
                self._release()
                raise
            except pool._dead_errors as e:
                pool._died(self._rep, e)
                self._release()
                if self._sent or self._closed:
                    raise
                pool.stats.resubmitted_items += 1
                await pool._wait_for_live()
                self._open()
                continue
            self._sent += 1
            return out

    def _release(self) -> None:
        if self._rep is not None:
            self.engine._done(self._rep, self.params.n, self.request_id)
            self._rep = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gen is not None and self._rep is not None:
            try:
                self.engine.pool._ray.cancel(self._gen)
            except Exception:
                pass
            self.engine.abort(self.request_id)
        self._release()


