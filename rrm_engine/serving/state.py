"""What every route of one server shares (ServerState, on app.state.rrm), and the helpers the routes
use to run work without blocking the event loop or outliving their client."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from fastapi import Request

from ..async_engine import EngineDeadError
from ..judge.background_loop import background_loop
from ..judge.judge import Judge
from .groups import Groups
from .idempotency import Judgments
from .limits import Admission, Limits, max_token_chars
from .openrlhf import OpenRLHFConfig
from .prometheus import InvalidAlarmCollector, ServerMetrics

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected while its request ran; its engine requests were aborted."""


@dataclass
class ServerState:
    judge: Any  # a Judge, or a judge.pool.JudgePool (serve --data-parallel-size N): routes see one interface
    model_name: str
    default_max_tokens: int
    rlhf: OpenRLHFConfig
    limits: Limits
    admission: Admission
    metrics: ServerMetrics
    max_model_len: int | None
    vocab_size: int | None
    chars_per_token: int  # the most characters one token stands for (limits.check_chars)
    judgments: Judgments  # keyed judgments: a retry joins the one running (idempotency.py)
    groups: Groups  # trainer ranks meeting to rank their groups once (groups.py)
    # the server's tokenizer calls run in worker threads; HF tokenizers have raised "Already borrowed"
    # under concurrent use, so they take turns
    encode_lock: Any = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, judge: Judge | Any, model_name: str, default_max_tokens: int, rlhf: OpenRLHFConfig | None,
               limits: Limits | None, judgments: Judgments | None = None) -> "ServerState":
        limits = limits or Limits()
        engine = judge.engine
        replicas = getattr(judge, "replica_metrics", None)  # a JudgePool: what its replicas reported at start
        if replicas is not None:
            info = judge.info
            max_model_len, vocab_size = info["max_model_len"], info["vocab_size"]
            pool_tokens = info["pool_tokens"] * judge.num_replicas if info["pool_tokens"] else None
        else:
            core = getattr(judge.llm, "engine", None)
            max_model_len = getattr(core, "max_model_len", None)
            vocab_size = getattr(core, "vocab_size", None)
            pool = getattr(core, "pool", None)
            pool_tokens = pool.num_blocks * pool.block_size if pool is not None else None
        bound = limits.max_pending_tokens or 16 * (pool_tokens or 2 ** 20)

        def tokens_per_s() -> float:
            return float(engine.metrics().get("tokens_per_s", 0.0) or 0.0)

        admission = Admission(limits.max_pending_requests, bound, tokens_per_s)
        judgments = judgments if judgments is not None else Judgments()
        metrics = ServerMetrics(engine.metrics, model_name,
                                lambda: (admission.requests, admission.tokens, admission.max_tokens), judgments,
                                replicas=judge if replicas is not None else None)
        groups = Groups()
        metrics.registry.register(groups)
        alarm = getattr(judge, "invalid_alarm", None)  # judge/alarm.py (a JudgePool's replicas keep their own)
        if alarm is not None:
            metrics.registry.register(InvalidAlarmCollector(alarm))
        tok = engine.tokenizer
        return cls(judge, model_name, default_max_tokens, rlhf or OpenRLHFConfig(), limits, admission, metrics,
                   max_model_len, vocab_size, max_token_chars(tok) if tok is not None else 0, judgments, groups,
                   # the LLM's own (LLM.encode takes it), so that the server and the engine's callers
                   # take turns on the one tokenizer
                   getattr(getattr(judge, "llm", None), "tokenizer_lock", None) or threading.Lock())

    @property
    def engine(self) -> Any:
        return self.judge.engine

    @property
    def tok(self) -> Any:
        return self.judge.engine.tokenizer

    def health(self) -> tuple[str, str | None]:
        """("ok", None), ("degraded", why) while a replica of a pool is missing (still serving), or
        ("dead", why)."""
        pool_health = getattr(self.judge, "health", None)
        if pool_health is not None:
            return pool_health()
        problem = self.engine_problem()
        return ("ok", None) if problem is None else ("dead", problem)

    def engine_problem(self) -> str | None:
        """Why the engine cannot serve (its loop died or was shut down), or None while it can; a pool
        cannot serve only with no replica live and none starting."""
        if getattr(self.judge, "health", None) is not None:
            status, why = self.judge.health()
            return why if status == "dead" else None
        return getattr(self.judge.engine, "problem", None)  # AsyncLLM.problem (a lockstep engine has none)

    def check_alive(self) -> None:
        """EngineDeadError (503) before a request is admitted, rather than items failed one by one."""
        problem = self.engine_problem()
        if problem is not None:
            raise EngineDeadError(problem)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, computed in a worker thread: a long text never blocks the event loop."""
        def work() -> list[int]:
            with self.encode_lock:
                return list(self.tok(text, add_special_tokens=add_special_tokens)["input_ids"])
        return await asyncio.to_thread(work)


def state_of(request: Request) -> ServerState:
    return request.app.state.rrm


def arrival(request: Request) -> float:
    """When the request arrived (limits.Gate stamps it), as time.perf_counter()."""
    return request.scope.get("rrm_t0", time.perf_counter())


async def on_judge_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a judge coroutine on the judge's background loop: what it does on the CPU (tokenising
    items, building prompts, reading votes) then never blocks this server's event loop, and /health
    answers whatever a judge request holds. Cancelling the awaiting task cancels the coroutine there
    (which aborts its engine requests)."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, background_loop()))


async def watch(request: Request, work: Awaitable[Any], on_disconnect: Callable[[], None] | None = None) -> Any:
    """Await `work`; if the client goes away first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                task.add_done_callback(_consume)  # its CancelledError has nobody to go to
                if on_disconnect is not None:
                    on_disconnect()
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


