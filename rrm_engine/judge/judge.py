"""The scorer API: Judge.compare / compare_batch / rank / rank_batch over the engine's public API.

One judgment: build the RRM prompt (prompt.py), submit it to the engine with n = votes (one prompt,
prefilled once and forked), read each vote (verdict.py), aggregate (voting.py). Every request of a
batch goes through one add_request/step loop, so the engine batches all of them together;
tournaments submit a match as soon as both of its players are known.

Reading votes. A vote whose text carries no valid verdict (cut by the thinking budget, EOS without a
box, ...) is, unless `strict`, continued with the forced text "[\\n</think>]\\n\\n\\boxed{Assistant "
(the close marker only when the thinking section is still open) and its verdict is read from the
next-token log-probs of "1" vs "2": every vote then yields a verdict and a soft score p_first.
`strict=True` is paper-faithful: nothing is forced, "</think>" is required, invalid stays invalid.
When the model's template does not open a thinking section (the embedded SmolLM2) and the text
never opens one itself, the non-strict judge reads the whole text as the answer.

Votes are read as their samples finish (step() reports a request whenever one of its samples ends);
adaptive voting (`adaptive=True`) aborts the comparison's requests once the majority cannot change.
"""
from __future__ import annotations

import inspect
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from .defaults import default_max_tokens
from .prompt import THINK_CLOSE, THINK_OPEN, PromptBuilder, RRMPrompt, check_text
from .tournament import Knockout, Match, RoundRobin, Tournament
from .verdict import read_verdict
from .voting import SWAP_MODES, SwapMode, Vote, decided, presentation_orders, tally, unswap

Method = Literal["knockout", "elo"]


def _engine_api() -> tuple[Any, Any]:
    """(LLM, SamplingParams) from the public API, imported late (rrm_engine may import this module)."""
    import rrm_engine

    llm_cls = getattr(rrm_engine, "LLM", None)
    sp = getattr(rrm_engine, "SamplingParams", None)
    if sp is None:  # until the package exports it
        from rrm_engine.sampling_params import SamplingParams as sp
    return llm_cls, sp


@dataclass
class Comparison:
    winner: int | None  # 0: response a, 1: response b, None: no decision (see voting.py tie rule)
    votes: list[Vote]
    counts: tuple[int, int]  # valid votes for a, for b
    p_first: float | None  # mean P(a better) over valid votes
    invalid: int
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    tokens_used: int = 0  # generated tokens of all votes, forced continuations included
    votes_aborted: int = 0  # adaptive voting: votes stopped once the majority was decided
    tokens_saved: int = 0  # estimate: aborted votes x mean tokens of the completed ones
    error: str | None = None  # this item failed (bad input or engine error); the others did not


@dataclass
class RankedMatch:
    i: int
    j: int
    round: int
    winner: int | None  # candidate index; knockout fills a coin flip when the comparison had none
    invalid: bool
    comparison: Comparison


@dataclass
class Ranking:
    order: list[int]  # candidate indices, best first
    scores: list[float]  # knockout: rounds survived; elo: ELO-scale Bradley-Terry ratings
    matches: list[RankedMatch]
    invalid: int  # matches whose comparison gave no winner
    tokens_used: int
    method: str = "knockout"
    error: str | None = None


def _failed(err: str) -> Comparison:
    return Comparison(None, [], (0, 0), None, 0, error=err)


class _Driver:
    """The add_request / step loop: callbacks run as requests finish and may submit more work.

    With a timeout, everything still running at the deadline is aborted in the engine and its
    comparisons fail with error "timeout" (invalid, never a made-up verdict)."""

    def __init__(self, llm: Any, timeout: float | None = None):
        self.llm = llm
        self.waiting: dict[str, Callable[[Any], None]] = {}
        self.jobs: list[_CompareJob] = []
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.closed = False

    def submit(self, prompt_ids: list[int], params: Any, on_done: Callable[[Any], None]) -> str:
        if self.closed:
            raise TimeoutError("timeout")
        rid = self.llm.add_request(prompt_ids, params)
        self.waiting[rid] = on_done
        return rid

    def abort(self, rid: str) -> None:
        if self.waiting.pop(rid, None) is not None:
            self.llm.abort(rid)

    def _expire(self) -> None:
        self.closed = True
        for rid in list(self.waiting):
            self.abort(rid)
        for job in list(self.jobs):
            if not job.finished:
                job._fail("timeout")

    def run(self) -> None:
        while self.waiting:
            if self.deadline is not None and time.monotonic() > self.deadline:
                self._expire()
                break
            outs = self.llm.step()
            for out in outs:
                cb = self.waiting.get(out.request_id)
                if out.finished:
                    self.waiting.pop(out.request_id, None)
                if cb is not None:
                    cb(out)
            if not outs and not self.llm.has_unfinished() and self.waiting:
                raise RuntimeError(f"engine idle with {len(self.waiting)} request(s) never returned")


class _CompareJob:
    """The votes of one comparison, from submission to the Comparison."""

    def __init__(self, judge: "Judge", query: str, a: str, b: str, votes: int, rng: random.Random,
                 on_done: Callable[[Comparison], None]):
        self.judge, self.on_done = judge, on_done
        self.k = votes
        self.orders = presentation_orders(votes, judge.swap, rng)
        self.prompts: dict[bool, RRMPrompt] = {}
        for swapped in set(self.orders):
            self.prompts[swapped] = judge.builder.build(query, b, a) if swapped else judge.builder.build(query, a, b)
        self.seed = rng.randrange(2**31)
        self.votes: dict[int, Vote] = {}
        self.live: dict[str, list[int]] = {}  # request id -> vote indices it carries
        self.seen: set[tuple[str, int]] = set()  # (request id, sample index) already read
        self.finished = False

    def start(self, driver: _Driver) -> None:
        self.driver = driver
        driver.jobs.append(self)
        try:  # one request per presentation order, n = its votes: prefilled once, forked
            for swapped in sorted(set(self.orders)):
                idx = [v for v, s in enumerate(self.orders) if s == swapped]
                self._submit(swapped, idx, self.judge._params(len(idx), self.seed + idx[0]))
        except Exception as e:  # e.g. a prompt longer than the context: this item only
            self._fail(f"{type(e).__name__}: {e}")

    def _submit(self, swapped: bool, idx: list[int], params: Any) -> None:
        prompt = self.prompts[swapped]
        rid = self.driver.submit(prompt.token_ids, params, lambda out: self._on_output(out, swapped, idx))
        self.live[rid] = idx

    def _fail(self, err: str) -> None:
        for rid in list(self.live):
            self.driver.abort(rid)
        self.live.clear()
        if not self.finished:
            self.finished = True
            self.on_done(_failed(err))

    def _on_output(self, out: Any, swapped: bool, idx: list[int]) -> None:
        """Called for every step in which one of the request's samples finished (votes are read
        one by one, so adaptive voting can stop the rest)."""
        if out.finished:
            self.live.pop(out.request_id, None)
        if self.finished:
            return
        for comp in out.outputs:
            key = (out.request_id, comp.index)
            if comp.finish_reason is not None and key not in self.seen:
                self.seen.add(key)
                self._read(idx[comp.index], comp, swapped, out.prompt_token_ids)
        self._maybe_done()

    def _read(self, v: int, comp: Any, swapped: bool, prompt_ids: list[int]) -> None:
        j = self.judge
        prompt = self.prompts[swapped]
        opened = j.builder.think_open in comp.text
        need_close = j.strict or prompt.opens_think or opened
        verdict, reason = read_verdict(comp.text, comp.finish_reason, require_think_end=need_close,
                                       think_close=j.builder.think_close)
        tokens = len(comp.token_ids)
        if verdict is not None or j.strict or comp.finish_reason == "abort":
            p = None if verdict is None else float(verdict == 1)
            verdict, p = unswap(verdict, p, swapped)
            self.votes[v] = Vote(verdict, reason, comp.text, tokens, p, swapped, token_ids=list(comp.token_ids))
            return
        # force the answer: prompt + generated tokens (minus a final EOS) + the forced text
        gen = list(comp.token_ids)
        if gen and (gen[-1] == getattr(comp, "stop_reason", None) or gen[-1] in j.eos_ids):
            gen = gen[:-1]
        still_thinking = (prompt.opens_think and j.builder.think_close not in comp.text) or (
            comp.text.rfind(j.builder.think_open) > comp.text.rfind(j.builder.think_close))
        forced_ids, id1, id2 = j.forced_ids(still_thinking)
        params = j._sp(n=1, temperature=0.0, max_tokens=1, logprob_token_ids=[id1, id2])

        def on_forced(out: Any) -> None:
            if not out.finished:
                return
            self.live.pop(out.request_id, None)
            if self.finished:
                return
            c = out.outputs[0]
            lp = (c.logprobs or [{}])[0]
            if id1 not in lp or id2 not in lp:
                self.votes[v] = Vote(None, reason, comp.text, tokens, None, swapped, token_ids=list(comp.token_ids))
            else:
                p1 = 1.0 / (1.0 + math.exp(lp[id2] - lp[id1]))  # P("1") renormalised over {"1", "2"}
                fv = None if p1 == 0.5 else (1 if p1 > 0.5 else 2)
                fv, p = unswap(fv, p1, swapped)
                self.votes[v] = Vote(fv, reason, comp.text, tokens + len(forced_ids) + 1, p, swapped, forced=True,
                                     token_ids=list(comp.token_ids))
            self._maybe_done()

        try:
            rid = self.driver.submit(prompt_ids + gen + forced_ids, params, on_forced)
            self.live[rid] = [v]
        except Exception as e:
            self.votes[v] = Vote(None, "error", comp.text, tokens, None, swapped, token_ids=list(comp.token_ids))
            self.judge._log_error(e)

    def _maybe_done(self) -> None:
        if self.finished:
            return
        done = [self.votes[v] for v in sorted(self.votes)]
        aborted = 0
        if len(done) < self.k:
            if not (self.judge.adaptive and decided(done, self.k)):
                return
            for rid in list(self.live):
                self.driver.abort(rid)
            self.live.clear()
            aborted = self.k - len(done)
        self.finished = True
        t = tally(done)
        used = sum(x.tokens for x in done)
        saved = round(aborted * used / len(done)) if done else 0
        self.on_done(Comparison(t.winner, done, t.counts, t.p_first, t.invalid, t.invalid_reasons, used,
                                aborted, saved))


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
    ):
        self._check_votes(votes)
        if max_tokens is None:  # per model (defaults.py): the paper's 8192, a small budget for the demo model
            max_tokens = default_max_tokens(llm)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if thinking_budget is not None and (not isinstance(thinking_budget, int) or thinking_budget < 1):
            raise ValueError(f"thinking_budget must be None or an int >= 1, got {thinking_budget!r}")
        if swap not in SWAP_MODES:
            raise ValueError(f"swap must be one of {SWAP_MODES}, got {swap!r}")
        _, self._sp = _engine_api()
        self._sp(temperature=temperature, top_p=top_p)  # let SamplingParams validate them now
        self.llm = llm
        self.votes, self.max_tokens, self.temperature, self.top_p = votes, max_tokens, temperature, top_p
        self.thinking_budget, self.strict, self.swap, self.seed, self.adaptive = (
            thinking_budget, strict, swap, seed, adaptive)
        kw: dict[str, Any] = {"chat_template": chat_template, "think_open": think_markers[0],
                              "think_close": think_markers[1]}
        if user_template is not None:
            kw["user_template"] = user_template
        self.builder = PromptBuilder(llm.tokenizer, **kw)
        eos = getattr(llm.tokenizer, "eos_token_id", None)
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        self._forced: dict[bool, tuple[list[int], int, int]] = {}
        self.errors: list[str] = []
        if not strict:
            self.forced_ids(True)  # fail now, not mid-batch, if the tokenizer cannot express it

    @classmethod
    def from_pretrained(cls, model: str = "embedded", **kwargs: Any) -> "Judge":
        """Judge over a new rrm_engine.LLM(model): keyword arguments that Judge takes (votes=,
        max_tokens=, ...) go to the Judge, the others (device=, dtype=, kv_cache_tokens=, ...) to LLM."""
        llm_cls, _ = _engine_api()
        if llm_cls is None:
            raise RuntimeError("rrm_engine.LLM is not available")
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "llm"}
        judge_kwargs = {k: v for k, v in kwargs.items() if k in own}
        llm_kwargs = {k: v for k, v in kwargs.items() if k not in own}
        return cls(llm_cls(model, **llm_kwargs), **judge_kwargs)

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _check_votes(k: Any) -> int:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"votes must be an int >= 1, got {k!r}")
        return k

    def _params(self, n: int, seed: int) -> Any:
        budget = self.max_tokens if self.thinking_budget is None else min(self.max_tokens, self.thinking_budget)
        return self._sp(n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=budget, seed=seed)

    def _log_error(self, e: Exception) -> None:
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

    def _rng(self, *key: Any) -> random.Random:
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
        out = self.compare_batch([(query, a, b)], votes=votes, errors="raise")[0]
        if out.error is not None:
            raise RuntimeError(out.error)
        return out

    def compare_batch(self, items: Sequence[tuple[str, str, str]], votes: int | None = None,
                      errors: Literal["raise", "return"] = "raise", progress: bool = False,
                      timeout: float | None = None,
                      on_result: Callable[[int, Comparison], None] | None = None) -> list[Comparison]:
        """Judge many (query, a, b) at once. errors="raise": a bad item raises ValueError before anything
        runs; "return": it comes back as a Comparison with `error` set and the others still run.
        timeout (seconds): items not finished by then come back with error "timeout".
        on_result(index, comparison): called as each item finishes (in completion order), e.g. to
        stream results to a file; progress=True shows a tqdm bar over items."""
        k = self._check_votes(self.votes if votes is None else votes)
        results: list[Comparison | None] = [None] * len(items)
        bar = _progress(progress, len(items), "compare")

        def put(n: int, c: Comparison) -> None:
            results[n] = c
            bar.update(1)
            if on_result is not None:
                on_result(n, c)

        valid: list[tuple[int, tuple[str, str, str]]] = []
        for n, item in enumerate(items):
            try:
                valid.append((n, self.validate_pair(item)))
            except ValueError as e:
                if errors == "raise":
                    bar.close()
                    raise ValueError(f"item {n}: {e}") from None
                put(n, _failed(f"ValueError: {e}"))
        driver = _Driver(self.llm, timeout)

        def finish(n: int) -> Callable[[Comparison], None]:
            return lambda c: put(n, c)

        # grouped by query so that each query's prompts reach the engine together (shared prefix)
        valid.sort(key=lambda x: x[1][0])
        for n, (q, a, b) in valid:
            try:
                # seeded by content, not batch position: the same item gets the same votes in any batch,
                # on any replica of a pool
                _CompareJob(self, q, a, b, k, self._rng("c", q, a, b), finish(n)).start(driver)
            except ValueError as e:
                put(n, _failed(f"ValueError: {e}"))
        try:
            driver.run()
        finally:
            bar.close()
        return [r if r is not None else _failed("no result") for r in results]

    # -- rankings --------------------------------------------------------------------------------
    def rank(self, query: str, candidates: Sequence[str], method: Method = "knockout",
             votes: int | None = None) -> Ranking:
        out = self.rank_batch([(query, candidates)], method=method, votes=votes, errors="raise")[0]
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
        """Rank the candidates of many queries; all their matches share one engine loop.
        on_result(index, ranking): called as each query's ranking is complete."""
        k = self._check_votes(self.votes if votes is None else votes)
        if method not in ("knockout", "elo"):
            raise ValueError(f"method must be 'knockout' or 'elo', got {method!r}")
        results: list[Ranking | None] = [None] * len(items)
        valid = []
        for n, item in enumerate(items):
            try:
                valid.append((n, self.validate_rank(item)))
            except ValueError as e:
                if errors == "raise":
                    raise ValueError(f"item {n}: {e}") from None
                results[n] = Ranking([], [], [], 0, 0, method, error=f"ValueError: {e}")
                if on_result is not None:
                    on_result(n, results[n])
        bar = _progress(progress, len(valid), f"rank ({method})")
        driver = _Driver(self.llm, timeout)
        for n, (q, cands) in valid:
            t: Tournament = Knockout(len(cands), self.seed) if method == "knockout" else RoundRobin(len(cands), self.seed)
            _RankJob(self, n, q, cands, t, method, k, driver, results, bar, on_result).advance()
        try:
            driver.run()
        finally:
            bar.close()
        return [r if r is not None else Ranking([], [], [], 0, 0, method, error="no result") for r in results]


class _RankJob:
    def __init__(self, judge: Judge, n: int, query: str, cands: list[str], t: Tournament, method: str, k: int,
                 driver: _Driver, results: list, bar: Any, on_result: Callable[[int, Ranking], None] | None = None):
        self.judge, self.n, self.query, self.cands, self.t = judge, n, query, cands, t
        self.method, self.k, self.driver, self.results, self.bar = method, k, driver, results, bar
        self.on_result = on_result
        self.records: dict[int, Comparison] = {}

    def advance(self) -> None:
        for m in self.t.ready():
            job = _CompareJob(self.judge, self.query, self.cands[m.i], self.cands[m.j], self.k,
                              self.judge._rng("r", self.query, *self.cands, m.id), lambda c, m=m: self._report(m, c))
            job.start(self.driver)
        if self.t.done and self.results[self.n] is None:
            self._finish()

    def _report(self, m: Match, c: Comparison) -> None:
        self.records[m.id] = c
        self.t.report(m.id, None if c.winner is None else (m.i, m.j)[c.winner])
        self.advance()

    def _finish(self) -> None:
        matches = [RankedMatch(m.i, m.j, m.round, m.winner, m.invalid, self.records[m.id]) for m in self.t.matches]
        errs = [r.comparison.error for r in matches if r.comparison.error]
        self.results[self.n] = Ranking(
            order=self.t.order(), scores=self.t.scores(), matches=matches,
            invalid=sum(r.comparison.winner is None for r in matches),
            tokens_used=sum(r.comparison.tokens_used for r in matches), method=self.method,
            error=f"{len(errs)} match(es) failed: {errs[0]}" if errs else None)
        self.bar.update(1)
        if self.on_result is not None:
            self.on_result(self.n, self.results[self.n])


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item")
