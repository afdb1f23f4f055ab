"""`LLM(path, tensor_parallel_size=N)` called from ONE process: it starts N worker processes (as
vLLM's multiprocessing executor does), each joins one torch.distributed group (NCCL on GPU, one
GPU per rank; gloo on CPU) and builds the rank's engine (core/builder.py), loading only its shard. The calling
process keeps no weights: its LLM's `engine` is a WorkerEngine that sends every engine call to
all ranks (they run the same SPMD engine in lockstep, see tensor_parallel.py) and returns rank
0's answer. LLM's own methods (generate, add_request, step, ...) and an AsyncLLM over that LLM
therefore run unchanged: one thread at a time sends a call to every rank (a lock), so every rank
sees the same calls in the same order. validate() and has_unfinished() answer here without a round
trip (the engine's fixed limits, and the state every reply carries), since AsyncLLM asks them of
every submission and every loop turn.

How the workers start (as vLLM does): forked where that is safe, i.e. this process has not
initialised CUDA yet (no torch context, no cuInit; and the platform forks: not macOS, not
Windows), so a plain script needs no
`if __name__ == "__main__":`; otherwise spawned, and spawned workers re-import the main script: one
without that guard would build the LLM again in every worker, so a worker that finds itself doing so
exits with _UNGUARDED_MAIN and the caller gets one line saying what to add. RRM_TP_START_METHOD=fork
or spawn chooses by hand (vLLM's VLLM_WORKER_MULTIPROC_METHOD).

A call that raises on every rank (a bad request, validated before anything is scheduled)
raises rank 0's exception here and the workers go on. Ranks that disagree (one raised, another
did not), a worker that dies or a call that outlasts `timeout` shut the workers down: their
collectives can no longer be trusted to line up.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import sys
import threading
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from ..core.engine import Engine

_STARTUP_TIMEOUT_S = 1800.0  # loading a large checkpoint and capturing graphs
_STRAGGLER_S = 60.0  # how long the other ranks may take once one rank has raised
_UNGUARDED_MAIN = 87  # exit code of a spawned worker that re-imported a main script building the LLM again
_START_METHOD_ENV = "RRM_TP_START_METHOD"
_IDLE = (False, 0, 0)  # (has_unfinished, waiting, running) of an engine with nothing to do


def start_method() -> str:
    """"fork" where this process has not initialised CUDA and the platform forks safely, else
    "spawn"; RRM_TP_START_METHOD overrides. A forked child of a process that initialised CUDA cannot
    use it (torch: "Cannot re-initialize CUDA in forked subprocess"), hence spawn there."""
    import torch

    chosen = os.environ.get(_START_METHOD_ENV)
    if chosen:
        if chosen not in ("fork", "spawn") or chosen not in multiprocessing.get_all_start_methods():
            raise ValueError(f"{_START_METHOD_ENV}={chosen!r}: use fork or spawn (fork only where the platform has it)")
        return chosen
    # macOS has fork, but system libraries break in forked children (CPython defaults to spawn there)
    forks = "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"
    return "fork" if forks and not torch.cuda.is_initialized() and not _cuda_driver_initialised() else "spawn"


def _cuda_driver_initialised() -> bool:
    """Whether this process has initialised the CUDA driver (cuInit), which a forked child inherits
    broken ("CUDA error: initialization error") even when torch has no context yet: e.g. after
    torch.cuda.is_available(), which asks the CUDA runtime for the device count. cuDeviceGetCount
    answers CUDA_ERROR_NOT_INITIALIZED (3) until cuInit has run, and does not run it itself."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False  # no CUDA driver on this machine: nothing to inherit
    count = ctypes.c_int()
    return driver.cuDeviceGetCount(ctypes.byref(count)) != 3


@dataclass
class _Limits:
    """What Engine.validate reads of an engine: its fixed limits, sent by rank 0 at start-up, so that
    a request is validated here, in the submitting thread, without a round trip to the ranks."""
    vocab_size: int
    max_model_len: int
    pool: Any  # block_size, num_blocks
    tokenizer: Any
    requests: dict = field(default_factory=dict)  # ids in use are checked by every rank's add_request


@dataclass
class _Pool:
    block_size: int
    num_blocks: int


def _state(engine: Engine | None) -> tuple[bool, int, int]:
    if engine is None:
        return _IDLE
    return engine.has_unfinished(), len(engine.scheduler.waiting), len(engine.scheduler.running)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(conn: Connection, status: str, value: Any, state: tuple[bool, int, int] = _IDLE) -> None:
    """One reply: (status, value, the engine's state after the call)."""
    try:
        conn.send_bytes(pickle.dumps((status, value, state)))
    except Exception as e:  # an exception or result that does not pickle: send what can be said of it
        conn.send_bytes(pickle.dumps(("error", RuntimeError(f"{type(value).__name__}: {value} ({e})"), state)))


def _worker(rank: int, world: int, port: int, model: Any, llm_kwargs: dict, conn: Connection) -> None:
    """One rank: join the group, build the LLM, then serve engine calls until told to stop or
    until the parent goes away."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    from ..core.builder import build_engine
    from .tensor_parallel import init_tensor_parallel

    # A forked rank also holds copies of the parent's ends of the pipes (its own and earlier ranks'),
    # so recv() would never see EOF when the parent dies: watch the parent's sentinel as well. A rank
    # that leaves closes its copies, so the ranks started before it see the parent gone in turn.
    parent = multiprocessing.parent_process()
    if not torch.cuda.is_available():  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        init_tensor_parallel()
        built = build_engine(model, tensor_parallel_size=world, **llm_kwargs)
        loaded, engine = built.loaded, built.engine
        info = dict(tokenizer=loaded.tokenizer, config=loaded.config, eos_token_ids=loaded.eos_token_ids,
                    generation=loaded.generation, name=loaded.name, bytes_read=loaded.bytes_read,
                    memory_plan=built.memory_plan, vocab_size=engine.vocab_size, max_model_len=engine.max_model_len,
                    block_size=engine.pool.block_size, num_blocks=engine.pool.num_blocks)
        _send(conn, "ok", info if rank == 0 else None)
    except BaseException as e:
        _send(conn, "error", e)
        raise
    try:
        while True:
            if parent is not None and parent.sentinel in wait([conn, parent.sentinel]) and not conn.poll():
                return  # the parent went away
            try:
                method, args, kwargs = pickle.loads(conn.recv_bytes())
            except EOFError:
                return
            if method is None:
                _send(conn, "ok", None)
                return
            try:
                result = getattr(engine, method)(*args, **kwargs)
                _send(conn, "ok", result if rank == 0 else None, _state(engine))
            except Exception as e:
                _send(conn, "error", e, _state(engine))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerEngine:
    """The calling process's stand-in for Engine: every method call goes to all ranks."""

    def __init__(self, model: Any, llm_kwargs: dict, world: int, timeout: float = 600.0):
        import torch.multiprocessing as mp

        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # a spawned worker importing a main script that builds the LLM at top level: the parent
            # says what to add (one line); a traceback from each worker would only bury it
            raise SystemExit(_UNGUARDED_MAIN)
        self.start_method = start_method()
        ctx = mp.get_context(self.start_method)
        port = _free_port()
        self.world, self.timeout = world, timeout
        self._lock = threading.Lock()  # one call at a time reaches the ranks, whole: they see the same order
        self._state = _IDLE
        self._conns: list[Connection] = []
        self._procs = []
        for rank in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world, port, model, llm_kwargs, child), daemon=True)
            _start(proc, self.start_method)
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns)
        self.info: dict = self._gather("starting the tensor-parallel workers", _STARTUP_TIMEOUT_S)
        info = self.info
        self._limits = _Limits(info["vocab_size"], info["max_model_len"], _Pool(info["block_size"], info["num_blocks"]),
                               info["tokenizer"])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or not callable(getattr(Engine, name, None)):
            raise AttributeError(f"Engine.{name} is not reachable from the calling process: with "
                                 f"tensor_parallel_size={self.world} the engines live in the spawned workers")

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, *args, **kwargs)
        return call

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run Engine.<method>(*args, **kwargs) on every rank; rank 0's result. Thread-safe: the
        calls of several threads reach the ranks one whole call after another."""
        msg = pickle.dumps((method, args, kwargs))
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("the tensor-parallel workers have been shut down")
            for conn in self._conns:
                conn.send_bytes(msg)
            return self._gather(f"Engine.{method}", self.timeout)

    def validate(self, prompt_token_ids: list[int], params: Any, request_id: str | None = None) -> None:
        """Engine.validate, here (no round trip): it reads only the engine's fixed limits. A request
        id already in use is refused by the ranks' add_request."""
        Engine.validate(self._limits, prompt_token_ids, params, request_id)  # type: ignore[arg-type]

    def has_unfinished(self) -> bool:
        """Rank 0's engine.has_unfinished() after the last call: every change of the engine's state
        is a call, and every reply carries the state."""
        return self._state[0]

    def queue_lengths(self) -> tuple[int, int]:
        """(waiting, running): sequences in rank 0's scheduler queues after the last call."""
        return self._state[1], self._state[2]

    def shutdown(self) -> None:
        """Stop the workers (also done when this object is garbage-collected or at exit)."""
        self._finalizer()

    def _gather(self, what: str, timeout: float) -> Any:
        replies: dict[int, tuple[str, Any, tuple[bool, int, int]]] = {}
        waiting = {conn: r for r, conn in enumerate(self._conns)}
        while waiting:
            if any(r[0] == "error" for r in replies.values()):
                # a rank that failed alone leaves the others blocked in a collective: wait a little only
                timeout = min(timeout, _STRAGGLER_S)
            sentinels = {self._procs[r].sentinel: r for r in waiting.values()}
            ready = wait(list(waiting) + list(sentinels), timeout=timeout)
            if not ready:
                errors = [r[1] for r in replies.values() if r[0] == "error"]
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
                for r in dead:  # its sentinel is ready once it closed its files, maybe before it can be reaped
                    self._procs[r].join(timeout=5)
                codes = {r: self._procs[r].exitcode for r in dead}
                errors = [r[1] for r in replies.values() if r[0] == "error"]
                self.shutdown()
                if _UNGUARDED_MAIN in codes.values():
                    raise RuntimeError(_unguarded_main_message(self.world, self.start_method)) from None
                raise RuntimeError(f"tensor-parallel worker(s) died during {what} (rank: exit code {codes})"
                                   + (f"; first error: {errors[0]!r}" if errors else "")) from (errors[0] if errors else None)
        self._state = replies[0][2]
        statuses = {r[0] for r in replies.values()}
        if statuses == {"ok"}:
            return replies[0][1]
        if statuses == {"error"}:
            if what.startswith("starting"):
                self.shutdown()
            raise replies[0][1]
        self.shutdown()  # some ranks raised and others did not: no longer in lockstep
        failed = sorted(r for r, reply in replies.items() if reply[0] == "error")
        first = replies[failed[0]][1]
        raise RuntimeError(f"tensor-parallel ranks {failed} raised during {what} and the others did not; the workers "
                           f"were shut down: {first!r}") from first


def _start(proc: Any, method: str) -> None:
    """Start a worker. A fork happens on a fresh thread: GNU OpenMP (torch's CPU threads) keeps its
    thread pool in the thread that ran a parallel region, and a child forked from that thread finds the
    pool's threads gone and hangs in its first parallel region with more than one thread (seen with
    torch 2.13 + libgomp, 2026-12); a thread that never ran one forks a child that builds a new pool."""
    if method != "fork":
        proc.start()
        return
    failed: list[BaseException] = []

    def start() -> None:
        try:
            proc.start()
        except BaseException as e:  # raised in the caller's thread below
            failed.append(e)
    t = threading.Thread(target=start, name="rrm-tp-fork")
    t.start()
    t.join()
    if failed:
        raise failed[0]


def _unguarded_main_message(world: int, method: str) -> str:
    main = getattr(sys.modules.get("__main__"), "__file__", None) or "the main script"
    if os.environ.get(_START_METHOD_ENV):
        why = f"{_START_METHOD_ENV}={method}"
    elif "fork" not in multiprocessing.get_all_start_methods() or sys.platform == "darwin":
        why = "this platform does not fork them safely"
    else:
        why = "this process has initialised CUDA, which a forked worker could not use"
    return (f"tensor_parallel_size={world}: the workers are spawned ({why}) and re-import {main}, which builds the "
            f"LLM at top level: put that code under `if __name__ == \"__main__\":`")


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
