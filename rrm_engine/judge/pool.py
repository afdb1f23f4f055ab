"""JudgePool: judge replicas on Ray behind the Judge scorer API (compare_batch, rank_batch).

Each replica is one Ray actor holding an LLM + Judge (tensor_parallel_size > 1: that many actors,
one per GPU, packed on one node, joined in one torch.distributed group, each receiving the same
calls; rank 0's answer is the replica's). Work is split BY QUERY: all items of one query go to the
same replica in the same call, so the query's prompt prefix is prefilled once and shared there.
Query groups are packed into calls by load (longest first onto the least-loaded call), and a call
goes to whichever replica is idle, so a slow replica takes fewer calls.

Failures: a replica that dies (RayActorError / ActorDiedError) loses its in-flight call; that call's
items go back to the front of the queue for a live replica, and a new replica is started in the dead
one's place while restarts remain. Results are keyed by item index and accepted once; a second
answer for an item (a call that ran twice) is ignored and counted in `stats.duplicates_ignored`.
Every replica dead and none restartable: RuntimeError. Votes are seeded by item content
(judge.py), so an item gets the same votes on whichever replica scores it.

Ray is optional (`pip install 'rrm_engine[ray]'`) and imported only when a pool is built. Ray does
all the transport; there is no RPC of ours.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from .judge import Judge
from .results import Comparison, Ranking


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError("JudgePool needs Ray: pip install 'rrm_engine[ray]' (or pip install 'ray>=2.9')") from e
    return ray


@dataclass
class PoolStats:
    calls: int = 0  # calls sent to replicas (retries included)
    replicas_died: int = 0
    replicas_started: int = 0  # replacements started after a death (not the initial ones)
    resubmitted_items: int = 0  # items of calls lost with a replica and sent again
    duplicates_ignored: int = 0  # answers for items that already had one


@dataclass
class _Call:
    """One unit of dispatch: whole query groups, as item indices into the caller's list."""
    indices: list[int]
    load: int


@dataclass
class _Replica:
    id: int
    handles: list[Any]  # one Ray actor per tensor-parallel rank; rank 0 first
    placement_group: Any = None
    ready: bool = False
    start_refs: list[Any] = field(default_factory=list)  # until every rank has loaded its model
    busy: _Call | None = None
    call_refs: list[Any] = field(default_factory=list)  # the busy call on every rank still running
    answer_ref: Any = None  # rank 0's ref of the busy call: its answer is the replica's


class ReplicaActor:
    """Runs inside a Ray actor (wrapped with ray.remote by the pool): one rank of one replica."""

    def __init__(self, model: str, llm_kwargs: dict, judge_kwargs: dict, tensor_parallel_size: int, rank: int):
        self.args = (model, llm_kwargs, judge_kwargs, tensor_parallel_size)
        self.rank = rank
        self.judge: Judge | None = None

    def rendezvous(self) -> tuple[str, int]:
        """(this node's address, a free port) for rank 0 to host the process group."""
        import socket

        import ray
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def start(self, master: tuple[str, int] | None) -> bool:
        import os

        import torch
        model, llm_kwargs, judge_kwargs, tp = self.args
        llm_kwargs = dict(llm_kwargs)
        if tp > 1:
            import torch.distributed as dist
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():  # Ray sets CUDA_VISIBLE_DEVICES to this actor's one GPU
                torch.cuda.set_device(0)
            os.environ.setdefault("MASTER_ADDR", master[0])
            dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank,
                                    world_size=tp)
            llm_kwargs["tensor_parallel_size"] = tp
        from rrm_engine import LLM
        self.judge = Judge(LLM(model, **llm_kwargs), **judge_kwargs)
        return True

    def compare_batch(self, indexed: list[tuple[int, tuple]], votes: int | None,
                      timeout: float | None) -> list[tuple[int, Comparison]]:
        out = self.judge.compare_batch([item for _, item in indexed], votes=votes, errors="return", timeout=timeout)
        return [(n, c) for (n, _), c in zip(indexed, out)]

    def rank_batch(self, indexed: list[tuple[int, tuple]], method: str, votes: int | None,
                   timeout: float | None) -> list[tuple[int, Ranking]]:
        out = self.judge.rank_batch([item for _, item in indexed], method=method, votes=votes, errors="return",
                                    timeout=timeout)
        return [(n, r) for (n, _), r in zip(indexed, out)]


class JudgePool:
    def __init__(self, model: str = "embedded", num_replicas: int = 2, llm_kwargs: dict | None = None,
                 judge_kwargs: dict | None = None, tensor_parallel_size: int = 1, ray_address: str | None = None,
                 use_gpu: bool | None = None, num_cpus: float = 1.0, calls_per_replica: int = 1,
                 max_restarts: int | None = None, start_timeout: float = 600.0):
        """use_gpu: None = when the Ray cluster has GPUs (each rank then takes one GPU).
        calls_per_replica: a batch is cut into about num_replicas * calls_per_replica calls; 1 keeps each
        replica's engine batch as large as possible, more balances uneven replicas better.
        max_restarts: replacements started after deaths over the pool's life (default num_replicas)."""
        for name, v in (("num_replicas", num_replicas), ("tensor_parallel_size", tensor_parallel_size),
                        ("calls_per_replica", calls_per_replica)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=ray_address)
        self._ray = ray
        self.model, self.tensor_parallel_size = model, tensor_parallel_size
        self.llm_kwargs, self.judge_kwargs = dict(llm_kwargs or {}), dict(judge_kwargs or {})
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        self.use_gpu, self.num_cpus = use_gpu, num_cpus
        self.calls_per_replica = calls_per_replica
        self.restarts_left = num_replicas if max_restarts is None else max_restarts
        self.start_timeout = start_timeout
        self.votes = self.judge_kwargs.get("votes", 1)
        self.stats = PoolStats()
        # called after each call is sent with (replica id, item indices): monitoring, and the tests'
        # way to kill a replica while it holds work
        self.on_dispatch: Callable[[int, list[int]], None] | None = None
        self._next_id = 0
        self.replicas: list[_Replica] = [self._spawn() for _ in range(num_replicas)]
        self._await_ready(self.replicas)

    # -- replicas ----------------------------------------------------------------------------------
    def _spawn(self) -> _Replica:
        ray, tp = self._ray, self.tensor_parallel_size
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": 1 if self.use_gpu else 0,
                                "max_restarts": 0, "max_task_retries": 0}  # the pool does the retrying
        pg = None
        if tp > 1:  # the ranks of one replica on one node (the collectives run every layer)
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            bundle = {"CPU": self.num_cpus, **({"GPU": 1} if self.use_gpu else {})}
            pg = placement_group([bundle] * tp, strategy="STRICT_PACK")
        cls = ray.remote(ReplicaActor)
        handles = []
        for rank in range(tp):
            o = dict(opts)
            if pg is not None:
                o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
            handles.append(cls.options(**o).remote(self.model, self.llm_kwargs, self.judge_kwargs, tp, rank))
        rep = _Replica(self._next_id, handles, pg)
        self._next_id += 1
        master = ray.get(handles[0].rendezvous.remote(), timeout=self.start_timeout) if tp > 1 else None
        rep.start_refs = [h.start.remote(master) for h in handles]
        return rep

    def _await_ready(self, reps: list[_Replica]) -> None:
        refs = [r for rep in reps for r in rep.start_refs]
        try:
            self._ray.get(refs, timeout=self.start_timeout)
        except Exception as e:
            for rep in reps:
                self._kill(rep)
            raise RuntimeError(f"JudgePool: a replica failed to start ({self.model!r}): {e}") from e
        for rep in reps:
            rep.ready, rep.start_refs = True, []

    def _kill(self, rep: _Replica) -> None:
        for h in rep.handles:
            try:
                self._ray.kill(h, no_restart=True)
            except Exception:  # already gone
                pass
        if rep.placement_group is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(rep.placement_group)

    def shutdown(self) -> None:
        """Kill every replica (the Ray cluster itself stays up)."""
        for rep in self.replicas:
            self._kill(rep)
        self.replicas = []

    def __enter__(self) -> "JudgePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- the scorer API ----------------------------------------------------------------------------
    def compare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None,
                      errors: Literal["raise", "return"] = "raise", timeout: float | None = None) -> list[Comparison]:
        """As Judge.compare_batch, spread over the replicas by query. timeout: per replica call."""
        k = Judge._check_votes(self.votes if votes is None else votes)
        results: dict[int, Comparison] = {}
        valid: list[int] = []
        for n, item in enumerate(items):
            try:
                Judge.validate_pair(item)  # the judge's own rules
                valid.append(n)
            except ValueError as e:
                if errors == "raise":
                    raise ValueError(f"item {n}: {e}") from None
                results[n] = Comparison(None, [], (0, 0), None, 0, error=f"ValueError: {e}")
        calls = self._pack(valid, [items[n][0] for n in valid], [k] * len(valid))
        self._run(calls, lambda h, idx: h.compare_batch.remote([(n, tuple(items[n])) for n in idx], votes, timeout),
                  results)
        return [results[n] for n in range(len(items))]

    def rank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: Literal["knockout", "elo"] = "knockout",
                   votes: int | None = None, errors: Literal["raise", "return"] = "raise",
                   timeout: float | None = None) -> list[Ranking]:
        """As Judge.rank_batch, spread over the replicas by query. timeout: per replica call."""
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

        calls = self._pack(valid, [items[n][0] for n in valid], [k * matches(len(items[n][1])) for n in valid])
        self._run(calls, lambda h, idx: h.rank_batch.remote([(n, (items[n][0], list(items[n][1]))) for n in idx],
                                                           method, votes, timeout), results)
        return [results[n] for n in range(len(items))]

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

    # -- splitting and running ---------------------------------------------------------------------
    def _pack(self, indices: list[int], queries: list[str], loads: list[int]) -> list[_Call]:
        """Group items by query, then pack the groups into calls: longest group first onto the
        least-loaded call (LPT). A query group is never split."""
        groups: dict[str, _Call] = {}
        for n, q, w in zip(indices, queries, loads):
            g = groups.setdefault(q, _Call([], 0))
            g.indices.append(n)
            g.load += w
        live = sum(1 for r in self.replicas if r.ready) or 1
        calls = [_Call([], 0) for _ in range(min(len(groups), live * self.calls_per_replica))]
        for g in sorted(groups.values(), key=lambda g: -g.load):
            c = min(calls, key=lambda c: c.load)
            c.indices += g.indices
            c.load += g.load
        return sorted(calls, key=lambda c: -c.load)

    def _run(self, calls: list[_Call], send: Callable[[Any, list[int]], Any], results: dict) -> None:
        ray = self._ray
        queue = deque(calls)
        expected = len(set(results) | {n for c in calls for n in c.indices})
        # until every item is scored and nothing is in flight: a late answer must not land in the next batch
        while len(results) < expected or any(rep.call_refs for rep in self.replicas):
            for rep in self.replicas:  # every idle replica takes the next call that still has work
                while queue and all(n in results for n in queue[0].indices):
                    queue.popleft()
                if rep.ready and rep.busy is None and queue:
                    rep.busy = queue.popleft()
                    rep.call_refs = [send(h, rep.busy.indices) for h in rep.handles]  # SPMD: all ranks, same call
                    rep.answer_ref = rep.call_refs[0]
                    self.stats.calls += 1
                    if self.on_dispatch is not None:
                        self.on_dispatch(rep.id, list(rep.busy.indices))
            owner = {ref: rep for rep in self.replicas for ref in rep.start_refs + rep.call_refs}
            if not owner:
                raise RuntimeError(f"JudgePool: every replica is dead and no restart is left "
                                   f"({self.stats.replicas_died} died); {expected - len(results)} item(s) not scored")
            # only replacements starting: give them start_timeout, then count them as dead
            in_calls = any(rep.call_refs for rep in self.replicas)
            done = ray.wait(list(owner), num_returns=1, timeout=None if in_calls else self.start_timeout)[0]
            if not done:
                for rep in [r for r in self.replicas if r.start_refs]:
                    self._replica_died(rep, queue, None)
                continue
            ref = done[0]
            rep = owner[ref]
            try:
                out = ray.get(ref)
            except self._dead_errors as e:
                self._replica_died(rep, queue, e)
                continue
            except Exception:
                if ref in rep.start_refs:  # a replacement that cannot start counts as dead
                    self._replica_died(rep, queue, None)
                    continue
                self._drain()  # an error inside the judge: let the other calls end, then tell the caller
                raise
            if ref in rep.start_refs:
                rep.start_refs.remove(ref)
                rep.ready = not rep.start_refs
                continue
            if ref == rep.answer_ref:  # rank 0 answers for the replica
                for n, res in out:
                    if n in results:
                        self.stats.duplicates_ignored += 1
                    else:
                        results[n] = res
            rep.call_refs.remove(ref)
            if not rep.call_refs:
                rep.busy = None

    def _replica_died(self, rep: _Replica, queue: deque, err: Exception | None) -> None:
        """Put its call back at the front of the queue, kill what is left of it (a tensor-parallel
        replica missing one rank would hang in a collective), start a replacement if allowed."""
        self.stats.replicas_died += 1
        if rep.busy is not None:
            queue.appendleft(rep.busy)
            self.stats.resubmitted_items += len(rep.busy.indices)
        self._kill(rep)
        self.replicas.remove(rep)
        if self.restarts_left > 0:
            self.restarts_left -= 1
            try:
                self.replicas.append(self._spawn())
                self.stats.replicas_started += 1
            except Exception:  # e.g. no node can host it now: carry on with the live ones
                pass

    def _drain(self) -> None:
        """Wait for every in-flight call to end, dropping the answers (they belong to a batch that
        is being abandoned), so the next batch starts from idle replicas."""
        refs = [r for rep in self.replicas for r in rep.call_refs]
        if refs:
            self._ray.wait(refs, num_returns=len(refs))
        for rep in self.replicas:
            rep.busy, rep.call_refs = None, []

    @property
    def _dead_errors(self) -> tuple[type, ...]:
        from ray.exceptions import ActorDiedError, RayActorError
        return (RayActorError, ActorDiedError)
