"""The votes of one comparison, from submission to the Comparison, as a coroutine on the AsyncLLM.

One request per presentation order with n = its votes (the prompt is prefilled once and forked).
Each finished sample is read (verdict.py); a vote that may be forced (voting.may_force) is continued
with the forced text as a one-token request whose log-probs of "1" vs "2" give its verdict.
Adaptive voting streams the requests (each item holds what is new per sample), reads votes as their
samples finish and, once the majority
cannot change, cancels the rest: cancelling a request's await aborts it in the engine. Cancelling
the whole job (a timeout, a disconnected client) aborts everything it still has in flight.

Loud, never silent: a forced continuation that fails (the engine raised, or did not return the
log-probs of "1" and "2" it was asked for) fails the whole comparison with that error, as a failed
vote request does. It is not retried: the engine's own failures are not transient in a way a retry
would fix, and answering from the remaining votes would change the reward without saying so.
Every finished comparison's votes go to the judge's invalid-rate alarm (alarm.py).
Verdicts come only from generated text (and forced log-probs), read with the judge's `reading`;
the prompt itself is never parsed.
"""
from __future__ import annotations

import asyncio
import math
import random
from typing import Any, Protocol

from ..outputs import CompletionOutput
from ..sampling_params import SamplingParams
from .alarm import InvalidRateAlarm
from .prompt import PromptBuilder, RRMPrompt
from .results import Comparison, failed_comparison
from .verdict import read_verdict
from .voting import Vote, decided, may_force, presentation_orders, tally, unswap

class JudgeSettings(Protocol):
    """What a comparison needs of its judge (judge.Judge is one): its settings, its prompt builder,
    the engine it submits to, and where it reports errors and votes."""
    swap: str
    adaptive: bool
    strict: bool
    force: str
    reading: str
    eos_ids: set[int]
    builder: PromptBuilder
    invalid_alarm: InvalidRateAlarm

    @property
    def engine(self) -> Any: ...

    def vote_params(self, n: int, seed: int) -> SamplingParams: ...

    def forced_params(self, id1: int, id2: int) -> SamplingParams: ...

    def forced_ids(self, close_think: bool) -> tuple[list[int], int, int]: ...

    def check_prompt(self, prompt_ids: list[int], params: Any) -> None: ...

    def log_error(self, e: Exception) -> None: ...


class PairJob:
    def __init__(self, judge: JudgeSettings, query: str, a: str, b: str, votes: int, rng: random.Random):
        self.judge, self.k = judge, votes
        self.orders = presentation_orders(votes, judge.swap, rng)
        self.prompts: dict[bool, RRMPrompt] = {
            swapped: judge.builder.build(query, b, a) if swapped else judge.builder.build(query, a, b)
            for swapped in set(self.orders)}
        self.seed = rng.randrange(2**31)
        self.votes: dict[int, Vote] = {}
        self.error: str | None = None
        self.settled = asyncio.Event()  # all votes in, the majority decided (adaptive), or an error

    def check(self) -> None:
        """Raise ValueError now if the engine would refuse a request of this comparison (a prompt longer
        than the context, or more KV than the pool holds), before anything is submitted."""
        for swapped, prompt in self.prompts.items():
            self.judge.check_prompt(prompt.token_ids, self.judge.vote_params(self.orders.count(swapped), 0))

    async def run(self) -> Comparison:
        groups = []
        for swapped in sorted(set(self.orders)):
            idx = [v for v, s in enumerate(self.orders) if s == swapped]
            groups.append(asyncio.ensure_future(self._group(swapped, idx)))
        all_done = asyncio.ensure_future(asyncio.gather(*groups))
        settled = asyncio.ensure_future(self.settled.wait())
        try:
            await asyncio.wait([all_done, settled], return_when=asyncio.FIRST_COMPLETED)
        finally:  # early stop, error or our own cancellation: whatever still runs is aborted
            for t in (*groups, all_done, settled):
                t.cancel()
            # a gather whose children were cancelled ends with CancelledError as its exception, not as
            # cancelled; unread, asyncio logs it as "exception was never retrieved" (a traceback per
            # comparison after a Ctrl-C). Read it: the cancellation itself is what we asked for.
            all_done.add_done_callback(lambda f: f.cancelled() or f.exception())
        if self.error is not None:
            return failed_comparison(self.error)
        done = [self.votes[v] for v in sorted(self.votes)]
        self.judge.invalid_alarm.record(done)
        aborted = self.k - len(done)
        t = tally(done)
        used = sum(x.tokens for x in done)
        saved = round(aborted * used / len(done)) if done else 0
        return Comparison(t.winner, done, t.counts, t.p_first, t.invalid, t.invalid_reasons, used, aborted, saved,
                          valid=t.valid, forced=t.forced)

    def _record(self, v: int, vote: Vote) -> None:
        if self.settled.is_set():  # decided already: this vote is one of the aborted ones
            return
        self.votes[v] = vote
        done = list(self.votes.values())
        if len(done) == self.k or (self.judge.adaptive and decided(done, self.k)):
            self.settled.set()

    def _fail(self, err: str) -> None:
        """The comparison fails with err (the first error wins); whatever still runs is aborted."""
        self.error = self.error or err
        self.settled.set()

    async def _group(self, swapped: bool, idx: list[int]) -> None:
        """The request of one presentation order: its samples are votes idx[0], idx[1], ..."""
        engine, prompt = self.judge.engine, self.prompts[swapped]
        params = self.judge.vote_params(len(idx), self.seed + idx[0])
        reads: list[asyncio.Future] = []
        try:
            if not self.judge.adaptive:
                out = await engine.generate(prompt.token_ids, params)
                for comp in out.outputs:
                    reads.append(asyncio.ensure_future(self._read(idx[comp.index], comp, swapped)))
            else:  # stream items carry what is new for each sample: join them until a sample finishes
                texts: dict[int, list[str]] = {}
                tokens: dict[int, list[int]] = {}
                finished: set[int] = set()  # later items repeat a finished sample's finish_reason
                async for out in engine.stream(prompt.token_ids, params):
                    for comp in out.outputs:
                        if comp.index in finished:
                            continue
                        texts.setdefault(comp.index, []).append(comp.text)
                        tokens.setdefault(comp.index, []).extend(comp.token_ids)
                        if comp.finish_reason is not None:
                            finished.add(comp.index)
                            whole = CompletionOutput(comp.index, "".join(texts[comp.index]), tokens[comp.index],
                                                     comp.finish_reason, 0.0, stop_reason=comp.stop_reason)
                            reads.append(asyncio.ensure_future(self._read(idx[comp.index], whole, swapped)))
            await asyncio.gather(*reads)
        except asyncio.CancelledError:
            for r in reads:
                r.cancel()
            raise
        except Exception as e:  # e.g. a prompt longer than the context, or a failed engine step
            self._fail(f"{type(e).__name__}: {e}")

    async def _read(self, v: int, comp: Any, swapped: bool) -> None:
        j, prompt = self.judge, self.prompts[swapped]
        if comp.finish_reason == "abort":
            return  # stopped by someone else (the engine's abort): not a vote
        opened = j.builder.think_open in comp.text
        need_close = j.strict or prompt.opens_think or opened
        verdict, reason = read_verdict(comp.text, comp.finish_reason, require_think_end=need_close,
                                       think_close=j.builder.think_close, reading=j.reading)
        tokens, gen = len(comp.token_ids), list(comp.token_ids)
        if verdict is not None or not may_force(reason, j.force):
            p = None if verdict is None else float(verdict == 1)
            verdict, p = unswap(verdict, p, swapped)
            self._record(v, Vote(verdict, reason, comp.text, tokens, p, swapped, token_ids=gen))
            return
        # force the answer: prompt + generated tokens (minus a final EOS) + the forced text
        body = gen[:-1] if gen and (gen[-1] == getattr(comp, "stop_reason", None) or gen[-1] in j.eos_ids) else gen
        still_thinking = (prompt.opens_think and j.builder.think_close not in comp.text) or (
            comp.text.rfind(j.builder.think_open) > comp.text.rfind(j.builder.think_close))
        forced_ids, id1, id2 = j.forced_ids(still_thinking)
        params = j.forced_params(id1, id2)
        try:
            out = await j.engine.generate(prompt.token_ids + body + forced_ids, params)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the comparison fails with the error; never a verdict from fewer votes
            j.log_error(e)
            self._fail(f"forced continuation of vote {v} failed: {type(e).__name__}: {e}")
            return
        lp = (out.outputs[0].logprobs or [{}])[0] if out.outputs else {}
        if id1 not in lp or id2 not in lp:
            self._fail(f"forced continuation of vote {v}: the engine returned no log-probs for token ids "
                       f"{id1} and {id2}")
            return
        p1 = 1.0 / (1.0 + math.exp(lp[id2] - lp[id1]))  # P("1") renormalised over {"1", "2"}
        fv = None if p1 == 0.5 else (1 if p1 > 0.5 else 2)
        fv, p = unswap(fv, p1, swapped)
        self._record(v, Vote(fv, reason, comp.text, tokens + len(forced_ids) + 1, p, swapped, forced=True, token_ids=gen))
