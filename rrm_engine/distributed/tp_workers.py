"""`LLM(path, tensor_parallel_size=N)` called from ONE process: it spawns N worker processes (as
vLLM's multiprocessing executor does), each joins one torch.distributed group (NCCL on GPU, one
GPU per rank; gloo on CPU) and builds the rank's engine (core/builder.py), loading only its shard. The calling
process keeps no weights: its LLM's `engine` is a WorkerEngine that sends every engine call to
all ranks (they run the same SPMD engine in lockstep, see tensor_parallel.py) and returns rank
0's answer. LLM's own methods (generate, add_request, step, ...) therefore run unchanged.

A call that raises on every rank (a bad request, validated before anything is scheduled)
raises rank 0's exception here and the workers go on. Ranks that disagree (one raised, another
did not), a worker that dies or a call that outlasts `timeout` shut the workers down: their
collectives can no longer be trusted to line up.
"""
from __future__ import annotations

import os
import pickle
import socket
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

from ..core.engine import Engine

_STARTUP_TIMEOUT_S = 1800.0  # loading a large checkpoint and capturing graphs
_STRAGGLER_S = 60.0  # how long the other ranks may take once one rank has raised


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(conn: Connection, status: str, value: Any) -> None:
    try:
        conn.send_bytes(pickle.dumps((status, value)))
    except Exception as e:  # an exception or result that does not pickle: send what can be said of it
        conn.send_bytes(pickle.dumps(("error", RuntimeError(f"{type(value).__name__}: {value} ({e})"))))


def _worker(rank: int, world: int, port: int, model: Any, llm_kwargs: dict, conn: Connection) -> None:
    """One rank: join the group, build the LLM, then serve engine calls until told to stop or
    until the parent goes away (recv raises EOFError)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    from ..core.builder import build_engine
    from .tensor_parallel import init_tensor_parallel

    if not torch.cuda.is_available():  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        init_tensor_parallel()
        built = build_engine(model, tensor_parallel_size=world, **llm_kwargs)
        loaded = built.loaded
        info = dict(tokenizer=loaded.tokenizer, config=loaded.config, eos_token_ids=loaded.eos_token_ids,
                    generation=loaded.generation, name=loaded.name, bytes_read=loaded.bytes_read,
                    memory_plan=built.memory_plan)
        _send(conn, "ok", info if rank == 0 else None)
    except BaseException as e:
        _send(conn, "error", e)
        raise
    try:
        while True:
            try:
                method, args, kwargs = pickle.loads(conn.recv_bytes())
            except EOFError:
                return
            if method is None:
                _send(conn, "ok", None)
                return
            try:
                result = getattr(built.engine, method)(*args, **kwargs)
                _send(conn, "ok", result if rank == 0 else None)
            except Exception as e:
                _send(conn, "error", e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerEngine:
    """The calling process's stand-in for Engine: every method call goes to all ranks."""

    def __init__(self, model: Any, llm_kwargs: dict, world: int, timeout: float = 600.0):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = _free_port()
        self.world, self.timeout = world, timeout
        self._conns: list[Connection] = []
        self._procs = []
        for rank in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world, port, model, llm_kwargs, child), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns)
        self.info: dict = self._gather("starting the tensor-parallel workers", _STARTUP_TIMEOUT_S)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or not callable(getattr(Engine, name, None)):
            raise AttributeError(f"Engine.{name} is not reachable from the calling process: with "
                                 f"tensor_parallel_size={self.world} the engines live in the spawned workers")

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, *args, **kwargs)
        return call

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run Engine.<method>(*args, **kwargs) on every rank; rank 0's result."""
        if not self._finalizer.alive:
            raise RuntimeError("the tensor-parallel workers have been shut down")
        msg = pickle.dumps((method, args, kwargs))
        for conn in self._conns:
            conn.send_bytes(msg)
        return self._gather(f"Engine.{method}", self.timeout)

    def shutdown(self) -> None:
        """Stop the workers (also done when this object is garbage-collected or at exit)."""
        self._finalizer()

    def _gather(self, what: str, timeout: float) -> Any:
        replies: dict[int, tuple[str, Any]] = {}
        waiting = {conn: r for r, conn in enumerate(self._conns)}
        while waiting:
            if any(s == "error" for s, _ in replies.values()):
                # a rank that failed alone leaves the others blocked in a collective: wait a little only
                timeout = min(timeout, _STRAGGLER_S)
            sentinels = {self._procs[r].sentinel: r for r in waiting.values()}
            ready = wait(list(waiting) + list(sentinels), timeout=timeout)
            if not ready:
                errors = [v for s, v in replies.values() if s == "error"]
                self.shutdown()
                raise RuntimeError(f"tensor-parallel workers: ranks {sorted(waiting.values())} gave no answer to "
                                   f"{what} within {timeout:.0f}s; shut down") from (errors[0] if errors else None)
            for conn in [c for c in ready if c in waiting]:
                try:
                    replies[waiting[conn]] = pickle.loads(conn.recv_bytes())
                    del waiting[conn]
                except EOFError:
                    pass  # the process died: its sentinel reports it
            dead = [r for sentinel, r in sentinels.items() if sentinel in ready and r not in replies]
            if dead:
                codes = {r: self._procs[r].exitcode for r in dead}
                errors = [v for s, v in replies.values() if s == "error"]
                self.shutdown()
                raise RuntimeError(f"tensor-parallel worker(s) died during {what} (rank: exit code {codes})"
                                   + (f"; first error: {errors[0]!r}" if errors else "")) from (errors[0] if errors else None)
        statuses = {s for s, _ in replies.values()}
        if statuses == {"ok"}:
            return replies[0][1]
        if statuses == {"error"}:
            if what.startswith("starting"):
                self.shutdown()
            raise replies[0][1]
        self.shutdown()  # some ranks raised and others did not: no longer in lockstep
        failed = sorted(r for r, (s, _) in replies.items() if s == "error")
        first = replies[failed[0]][1]
        raise RuntimeError(f"tensor-parallel ranks {failed} raised during {what} and the others did not; the workers "
                           f"were shut down: {first!r}") from first


def _stop(procs: list, conns: list[Connection]) -> None:
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps((None, (), {})))
        except (OSError, ValueError):
            pass
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    for conn in conns:
        conn.close()
