"""The scorer API: Judge.compare / compare_batch / rank / rank_batch, and their async forms
(acompare, acompare_batch, arank, arank_batch).

One judgment: build the RRM prompt (prompt.py), submit it to the engine with n = votes (one prompt,
prefilled once and forked), read each vote (verdict.py), aggregate (voting.py): pair_job.py. A
ranking is a tournament of such comparisons (rank_job.py, tournament.py).

Every request goes through the engine's AsyncLLM (rrm_engine/async_engine/async_llm.py), one per LLM and
shared by every Judge, adapter and server route over that LLM: its background thread runs the step
loop and batches whatever all callers have in flight. The async methods run on the caller's event
loop (any loop, several at once); the sync methods run the same coroutines on one background loop
(background_loop.py) and block, so they are safe from any number of threads.

Reading votes. A vote's verdict is read from its text (verdict.py). A vote that ran out of tokens
(thinking budget, max_tokens or context: reason "truncated") is then, by default, continued with the
forced text "[\\n</think>]\\n\\n\\boxed{Assistant " (the close marker only when the thinking section is
still open) and its verdict is read from the next-token log-probs of "1" vs "2": it counts as a
forced vote with a soft p_first. A vote that finished without an answer (\\boxed{both}, \\boxed{}, no box
after </think>, ...) stays invalid unless the caller opts in with force="invalid"; strict=True
(paper-faithful, the same as force="never") forces nothing and requires "</think>".
When the model's template does not open a thinking section (the embedded SmolLM2) and the text
never opens one itself, the non-strict judge reads the whole text as the answer.

Adaptive voting (`adaptive=True`) reads votes as their samples finish and aborts the comparison's
requests once the majority cannot change. A timeout aborts what is still running; those items come
back with error "timeout" (invalid, never a made-up verdict).
"""
from __future__ import annotations

import asyncio
import inspect
import random
import threading
from collections import deque
from typing import Any, Awaitable, Callable, Literal, Sequence

from ..async_engine import AsyncLLM
from ..llm import LLM
from ..sampling_params import SamplingParams
from .alarm import InvalidRateAlarm
from .background_loop import background_loop, run_sync
from .defaults import default_max_tokens
from ..async_engine.lockstep import LockstepEngine
from .pair_job import PairJob
from .prompt import THINK_CLOSE, THINK_OPEN, PromptBuilder, check_text
from .rank_job import rank_candidates
from .results import Comparison, RankedMatch, Ranking, failed_comparison, failed_ranking
from .verdict import Reading, check_reading
from .voting import FORCE_POLICIES, SWAP_MODES, ForcePolicy, SwapMode

Method = Literal["knockout", "elo"]
ERROR_HISTORY = 1000  # failures Judge.errors keeps

__all__ = ["Judge", "Comparison", "Ranking", "RankedMatch", "Method"]


class Judge:
    def __init__(
        self,
        llm: Any,
        votes: int = 1,
        max_tokens: int | None = None,
        temperature: float = 0.6,
        top_p: float = 1.0,
        thinking_budget: int | None = None,
        strict: bool = False,
        swap: SwapMode = "random",
        seed: int = 0,
        adaptive: bool = False,
        user_template: str | None = None,
        chat_template: str | None = None,
        think_markers: tuple[str, str] = (THINK_OPEN, THINK_CLOSE),
        force: ForcePolicy | None = None,
        reading: Reading | None = None,
    ):
        """force: which votes without a verdict get one read from log-probs: "truncated" (default:
        votes that ran out of tokens), "invalid" (opt-in: every vote without a verdict, explicit
        non-answers included) or "never" (strict=True implies it).
        reading: how a box's content is read (verdict.py): "exact" (the reference parser: "Assistant 1"
        or "Assistant 2" only; the default with strict=True) or "tolerant" (the default otherwise)."""
        self._check_votes(votes)
        self.reading: Reading = check_reading(("exact" if strict else "tolerant") if reading is None else reading)
        if max_tokens is None:  # per model (defaults.py): the paper's 8192, a small budget for the demo model
            max_tokens = default_max_tokens(llm)
        if force is None:
            force = "never" if strict else "truncated"
        if force not in FORCE_POLICIES:
            raise ValueError(f"force must be one of {FORCE_POLICIES}, got {force!r}")
        if strict and force != "never":
            raise ValueError(f"strict=True forces nothing; it cannot be combined with force={force!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if thinking_budget is not None and (not isinstance(thinking_budget, int) or thinking_budget < 1):
            raise ValueError(f"thinking_budget must be None or an int >= 1, got {thinking_budget!r}")
        if swap not in SWAP_MODES:
            raise ValueError(f"swap must be one of {SWAP_MODES}, got {swap!r}")
        SamplingParams(temperature=temperature, top_p=top_p)  # let SamplingParams validate them now
        if hasattr(llm, "submit") and hasattr(llm, "llm"):  # an AsyncLLM: judge over its engine
            self.llm, self._engine = llm.llm, llm
        else:
            self.llm, self._engine = llm, None
        self.votes, self.max_tokens, self.temperature, self.top_p = votes, max_tokens, temperature, top_p
        self.thinking_budget, self.strict, self.swap, self.seed, self.adaptive = (
            thinking_budget, strict, swap, seed, adaptive)
        self.force: ForcePolicy = force
        kw: dict[str, Any] = {"chat_template": chat_template, "think_open": think_markers[0],
                              "think_close": think_markers[1]}
        if user_template is not None:
            kw["user_template"] = user_template
        self.builder = PromptBuilder(self.llm.tokenizer, **kw)
        eos = getattr(self.llm.tokenizer, "eos_token_id", None)
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        self._forced: dict[bool, tuple[list[int], int, int]] = {}
        # the latest ERROR_HISTORY failures (oldest dropped): a long-running server must not grow without end
        self.errors: deque[str] = deque(maxlen=ERROR_HISTORY)
        self.invalid_alarm = InvalidRateAlarm()  # alarm.py: metric + one warning when votes are mostly invalid
        if force != "never":
            self.forced_ids(True)  # fail now, not mid-batch, if the tokenizer cannot express it

    @classmethod
    def from_pretrained(cls, model: str = "embedded", **kwargs: Any) -> "Judge":
        """Judge over a new rrm_engine.LLM(model): keyword arguments that Judge takes (votes=,
        max_tokens=, ...) go to the Judge, the others (device=, dtype=, kv_cache_tokens=, ...) to LLM."""
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "llm"}
        judge_kwargs = {k: v for k, v in kwargs.items() if k in own}
        llm_kwargs = {k: v for k, v in kwargs.items() if k not in own}
        return cls(LLM(model, **llm_kwargs), **judge_kwargs)

    @property
    def engine(self) -> Any:
        """The AsyncLLM every request goes through: the one of this LLM, shared with every other Judge,
        adapter and server route over it (created on first use), tensor-parallel ranks started by
        the LLM included. One rank of a process group (torchrun, a Ray replica), which an AsyncLLM
        cannot drive, is stepped in lockstep on the judge's background loop instead (async_engine/lockstep.py)."""
        with _engine_lock:
            if self._engine is None:
                try:
                    self._engine = AsyncLLM.of(self.llm)
                except ValueError:
                    if not getattr(self.llm, "tensor_parallel", False):
                        raise
                    self._engine = _lockstep_of(self.llm)
            return self._engine

    async def _on_engine_loop(self, coro: Any) -> Any:
        """Await coro here, or, for a lockstep engine bound to the background loop, there."""
        engine = self.engine
        if isinstance(engine, LockstepEngine) and asyncio.get_running_loop() is not engine.loop:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, engine.loop))
        return await coro

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _check_votes(k: Any) -> int:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"votes must be an int >= 1, got {k!r}")
        return k

    def vote_params(self, n: int, seed: int) -> SamplingParams:
        """The sampling of n votes that share one prompt (the judge's temperature, top_p, budget)."""
        budget = self.max_tokens if self.thinking_budget is None else min(self.max_tokens, self.thinking_budget)
        return SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=budget, seed=seed)

    @staticmethod
    def forced_params(id1: int, id2: int) -> SamplingParams:
        """One greedy token whose log-probs of "1" and "2" give a forced vote's verdict."""
        return SamplingParams(n=1, temperature=0.0, max_tokens=1, logprob_token_ids=[id1, id2])

    def check_prompt(self, prompt_ids: list[int], params: Any) -> None:
        """The engine's own admission check (ValueError naming what is wrong), without submitting."""
        engine = getattr(self.llm, "engine", None)
        if engine is not None and hasattr(engine, "validate"):
            engine.validate(prompt_ids, params)

    def _check_rank_fits(self, query: str, cands: list[str], votes: int) -> None:
        """The longest match of a ranking (its two longest candidates) must fit the engine."""
        if len(cands) < 2:
            return
        lengths = [len(self.builder.encode(c)) for c in cands]
        i, j = sorted(range(len(cands)), key=lambda x: -lengths[x])[:2]
        prompt = self.builder.build(query, cands[i], cands[j])
        try:
            self.check_prompt(prompt.token_ids, self.vote_params(votes, 0))
        except ValueError as e:
            raise ValueError(f"candidates {i} and {j}: {e}") from None

    def log_error(self, e: Exception) -> None:
        self.errors.append(f"{type(e).__name__}: {e}")

    def forced_text(self, close_think: bool) -> str:
        return ("\n" + self.builder.think_close if close_think else "") + "\n\n\\boxed{Assistant "

    def forced_ids(self, close_think: bool) -> tuple[list[int], int, int]:
        """(ids of the forced text, id of "1", id of "2") as this tokenizer splits them.

        Encoding text+"1" and text+"2" and taking their common prefix keeps whatever merge the
        tokenizer does at the boundary (a trailing space may belong to the digit's token)."""
        if close_think not in self._forced:
            text = self.forced_text(close_think)
            one, two = self.builder.encode(text + "1"), self.builder.encode(text + "2")
            k = 0
            while k < min(len(one), len(two)) and one[k] == two[k]:
                k += 1
            if len(one) != k + 1 or len(two) != k + 1:
                raise ValueError(f"the tokenizer does not end {text!r}+'1'/'2' with a single distinct token")
            self._forced[close_think] = (one[:k], one[k], two[k])
        return self._forced[close_think]

    def rng(self, *key: Any) -> random.Random:
        """A generator seeded by the judge's seed and `key` (an item's content): the same votes for the
        same item, whatever batch it came in."""
        return random.Random(":".join(map(str, (self.seed,) + key)))

    @staticmethod
    def validate_pair(item: Any) -> tuple[str, str, str]:
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ValueError(f"a comparison item must be (query, a, b), got {type(item).__name__}")
        q, a, b = item
        return check_text("query", q, allow_empty=False), check_text("response a", a), check_text("response b", b)

    @staticmethod
    def validate_rank(item: Any) -> tuple[str, list[str]]:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"a rank item must be (query, candidates), got {type(item).__name__}")
        q, cands = item
        check_text("query", q, allow_empty=False)
        if not isinstance(cands, (list, tuple)) or len(cands) < 2:
            raise ValueError(f"rank needs a list of at least 2 candidates, got {cands!r:.80}")
        for i, c in enumerate(cands):
            check_text(f"candidate {i}", c)
        return q, list(cands)

    # -- comparisons -----------------------------------------------------------------------------
    def compare(self, query: str, a: str, b: str, votes: int | None = None) -> Comparison:
        return run_sync(self.acompare(query, a, b, votes))

    async def acompare(self, query: str, a: str, b: str, votes: int | None = None) -> Comparison:
        out = (await self.acompare_batch([(query, a, b)], votes=votes, errors="raise"))[0]
        if out.error is not None:
            raise RuntimeError(out.error)
        return out

    def compare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None,
                      errors: Literal["raise", "return"] = "raise", progress: bool = False,
                      timeout: float | None = None,
                      on_result: Callable[[int, Comparison], None] | None = None) -> list[Comparison]:
        """Judge many (query, a, b) at once. errors="raise": a bad item raises ValueError before anything
        runs; "return": it comes back as a Comparison with `error` set and the others still run.
        timeout (seconds): items not finished by then are aborted and come back with error "timeout".
        on_result(index, comparison): called as each item finishes (in completion order), e.g. to
        stream results to a file; progress=True shows a tqdm bar over items."""
        return run_sync(self.acompare_batch(items, votes, errors, progress, timeout, on_result))

    async def acompare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None,
                             errors: Literal["raise", "return"] = "raise", progress: bool = False,
                             timeout: float | None = None,
                             on_result: Callable[[int, Comparison], None] | None = None) -> list[Comparison]:
        return await self._on_engine_loop(self._compare_batch(items, votes, errors, progress, timeout, on_result))

    async def _compare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None,
                             errors: Literal["raise", "return"], progress: bool, timeout: float | None,
                             on_result: Callable[[int, Comparison], None] | None) -> list[Comparison]:
        k = self._check_votes(self.votes if votes is None else votes)
        valid: list[tuple[int, tuple[str, str, str]]] = []
        refused: list[tuple[int, Comparison]] = []
        for n, item in enumerate(items):
            try:
                valid.append((n, self.validate_pair(item)))
            except ValueError as e:
                if errors == "raise":
                    raise ValueError(f"item {n}: {e}") from None
                refused.append((n, failed_comparison(f"ValueError: {e}")))
        # grouped by query so that each query's prompts reach the engine together (shared prefix);
        # seeded by content, not batch position: the same item gets the same votes in any batch, on any
        # replica of a pool, from any caller
        valid.sort(key=lambda x: x[1][0])
        jobs = []
        for n, (q, a, b) in valid:
            try:
                job = PairJob(self, q, a, b, k, self.rng("c", q, a, b))
                job.check()
            except ValueError as e:  # e.g. longer than the context: refused before anything runs
                if errors == "raise":
                    raise ValueError(f"item {n}: {e}") from None
                refused.append((n, failed_comparison(f"ValueError: {e}")))
                continue
            jobs.append((n, job.run))
        return await _run_items(len(items), refused, jobs, timeout, _progress(progress, len(items), "compare"),
                                failed_comparison, on_result)

    # -- rankings --------------------------------------------------------------------------------
    def rank(self, query: str, candidates: Sequence[str], method: Method = "knockout",
             votes: int | None = None) -> Ranking:
        return run_sync(self.arank(query, candidates, method, votes))

    async def arank(self, query: str, candidates: Sequence[str], method: Method = "knockout",
                    votes: int | None = None) -> Ranking:
        out = (await self.arank_batch([(query, candidates)], method=method, votes=votes, errors="raise"))[0]
        if out.error is not None:
            raise RuntimeError(out.error)
        return out

    def best_of_n(self, query: str, candidates: Sequence[str], method: Method = "knockout",
                  votes: int | None = None) -> int:
        return self.rank(query, candidates, method, votes).order[0]

    def rank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: Method = "knockout",
                   votes: int | None = None, errors: Literal["raise", "return"] = "raise",
                   progress: bool = False, timeout: float | None = None,
                   on_result: Callable[[int, Ranking], None] | None = None) -> list[Ranking]:
        """Rank the candidates of many queries; all their matches run on the engine together.
        on_result(index, ranking): called as each query's ranking is complete."""
        return run_sync(self.arank_batch(items, method, votes, errors, progress, timeout, on_result))

    async def arank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: Method = "knockout",
                          votes: int | None = None, errors: Literal["raise", "return"] = "raise",
                          progress: bool = False, timeout: float | None = None,
                          on_result: Callable[[int, Ranking], None] | None = None) -> list[Ranking]:
        return await self._on_engine_loop(self._rank_batch(items, method, votes, errors, progress, timeout,
                                                           on_result))

    async def _rank_batch(self, items: Sequence[tuple[str, Sequence[str]]], method: Method,
                          votes: int | None, errors: Literal["raise", "return"], progress: bool,
                          timeout: float | None, on_result: Callable[[int, Ranking], None] | None) -> list[Ranking]:
        k = self._check_votes(self.votes if votes is None else votes)
        if method not in ("knockout", "elo"):
            raise ValueError(f"method must be 'knockout' or 'elo', got {method!r}")
        valid, refused = [], []
        for n, item in enumerate(items):
            try:
                q, cands = self.validate_rank(item)
                self._check_rank_fits(q, cands, k)
                valid.append((n, (q, cands)))
            except ValueError as e:
                if errors == "raise":
                    raise ValueError(f"item {n}: {e}") from None
                refused.append((n, failed_ranking(method, f"ValueError: {e}")))
        jobs = [(n, lambda q=q, c=c: rank_candidates(self, q, c, method, k)) for n, (q, c) in valid]
        return await _run_items(len(items), refused, jobs, timeout, _progress(progress, len(items), f"rank ({method})"),
                                lambda err: failed_ranking(method, err), on_result)


async def _run_items(total: int, refused: list[tuple[int, Any]], jobs: list[tuple[int, Callable[[], Awaitable[Any]]]],
                     timeout: float | None, bar: Any, failed: Callable[[str], Any],
                     on_result: Callable[[int, Any], None] | None) -> list[Any]:
    """Run each item's coroutine as a task and return the results in item order. An item that raises
    fails alone; items still running at the timeout (or when this call is cancelled, or on_result
    raises) are cancelled, i.e. aborted in the engine. on_result sees every item as it is settled."""
    results: list[Any] = [None] * total

    def settle(n: int, r: Any) -> None:
        results[n] = r
        bar.update(1)
        if on_result is not None:
            on_result(n, r)

    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    tasks = {asyncio.ensure_future(make()): n for n, make in jobs}
    pending = set(tasks)
    try:
        for n, r in refused:
            settle(n, r)
        while pending:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=tasks.__getitem__):
                e = None if task.cancelled() else task.exception()
                r = failed("cancelled") if task.cancelled() else failed(f"{type(e).__name__}: {e}") if e else task.result()
                settle(tasks[task], r)
    finally:
        for task in pending:
            task.cancel()
        if pending:  # let the cancellations run, so that every abort reaches the engine
            await asyncio.gather(*pending, return_exceptions=True)
        bar.close()
    for task in sorted(pending, key=tasks.__getitem__):
        settle(tasks[task], failed("timeout"))
    return results


_engine_lock = threading.Lock()


def _lockstep_of(llm: Any) -> LockstepEngine:
    """The one lockstep engine of a tensor-parallel LLM (shared by every Judge over it, as an AsyncLLM is)."""
    engine = getattr(llm, "_rrm_lockstep", None)
    if engine is None:
        engine = LockstepEngine(llm, background_loop())
        llm._rrm_lockstep = engine
    return engine


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item")
