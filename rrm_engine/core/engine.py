"""The step loop: admit requests, schedule, run the decoder, sample, fork, stop, abort.

A request with n samples runs as one sequence until its prompt is prefilled; the step that
computes the prompt's last token samples n tokens from that one logits row (sample i with the
seed sample_seed(base_seed, i), offset = its generated-token index) and forks n-1 siblings
that share every block of the leader (a shared partial last block is copied on first write).

Limits, checked when a request is added, before anything is scheduled:
  * the prompt must be shorter than the model's context (max_position_embeddings); generation
    then ends with finish_reason "length" at max_tokens or at the context, whichever is first;
  * one sequence of the request, alone in the pool, must fit: ceil((prompt + max_tokens) /
    block_size) + 1 blocks (the +1 is room for a copy-on-write), else the request can never
    finish and is refused.

Failed steps. A step that raises anywhere (scheduling, copy-on-write copies, the decoder,
sampling, forking, appending) is rolled back before step() returns, so that nothing a later
request can see changed:
  * the tree nodes it inserted in flight are removed (with anything below them): they are never
    marked computed, so their unwritten or half-written KV is never matched;
  * every request with a sequence in the step fails: all its unfinished samples are dropped from
    the queues and their blocks released, without keeping their last block in the tree (it may be
    a copy-on-write target that was never copied); pending copies are therefore simply forgotten;
  * step() raises StepError naming the error, with the final outputs of the failed requests
    (finished, .error set, finish_reason "error" on the samples that were unfinished). Every other
    request goes on: keep calling step().
Failed requests are not retried: a fault that follows a request (a bad input the checks missed)
would fail again, and a retry would double its cost; the caller decides. A KeyboardInterrupt (or
other BaseException) is rolled back the same way and re-raised as it is; the failed outputs then
come back from the next step(). A step that fails without any request to blame re-raises the
original error (the engine stays consistent); a rollback that cannot restore the invariants
raises RuntimeError: the engine must not be used further.
"""
from __future__ import annotations

import itertools
import random
import time

import torch

from ..layers.attention import KVCache
from ..cache.block_pool import BlockPool
from .cuda_graphs import StaticDecode
from .detokenizer import IncrementalDetokenizer
from .metrics import Metrics
from .profiling import phase
from ..model.decoder import Decoder
from ..outputs import CompletionOutput, RequestOutput
from ..cache.radix_cache import RadixCache
from .runner import ModelRunner
from .sampler import SampleRequest, check_backend, sample, sample_seed
from ..sampling_params import SamplingParams
from .scheduler import Schedule, Scheduler
from .sequence import Request, Sequence, Status


class StepError(RuntimeError):
    """An engine step raised and was rolled back (see "Failed steps" above). `outputs`: final
    RequestOutputs of the requests it failed; `error`: the original exception (also __cause__).
    The engine is consistent: keep stepping, every other request goes on."""

    def __init__(self, error: BaseException, outputs: list[RequestOutput]):
        self.error = error
        self.outputs = outputs
        self.request_ids = [o.request_id for o in outputs]
        super().__init__(f"engine step failed with {type(error).__name__}: {error}; failed requests: {self.request_ids}")

    def __reduce__(self):  # pickled back from tensor-parallel worker processes
        return StepError, (self.error, self.outputs)


class _EngineStuck(RuntimeError):
    pass


class Engine:
    def __init__(self, model: Decoder, tokenizer, eos_token_ids: tuple[int, ...], *, num_blocks: int,
                 block_size: int = 16, enable_prefix_caching: bool = True, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, seed: int = 0, cuda_graphs: bool = False, sampler_backend: str = "auto",
                 kv_cache_dtype: torch.dtype | None = None):
        for name, v in (("num_blocks", num_blocks), ("block_size", block_size),
                        ("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.model, self.tokenizer = model, tokenizer
        self.sampler_backend = check_backend(sampler_backend)
        self.eos_token_ids = frozenset(eos_token_ids)
        cfg = model.cfg
        self.vocab_size, self.max_model_len = cfg.vocab_size, cfg.max_position_embeddings
        p = next(model.parameters())
        if sampler_backend == "csrc":
            if p.device.type != "cuda":
                raise ValueError(f"sampler_backend='csrc' needs the model on a CUDA device, got {p.device}")
            from rrm_kernels.csrc_ops import load
            load()  # JIT-build it now (about a minute, once per machine), not inside the first step
        # tensor-parallel shards hold fewer heads: size the cache from the module, not the config
        kv_heads = model.model.layers[0].self_attn.qkv_proj.part_sizes[1] // cfg.head_dim
        # one block more than the pool hands out: the scratch block that padded decode rows write to
        self.cache = KVCache.allocate(cfg.num_layers, num_blocks + 1, block_size, kv_heads, cfg.head_dim,
                                      kv_cache_dtype or p.dtype, p.device)
        self.pool = BlockPool(num_blocks, block_size)
        self.tree = RadixCache(self.pool) if enable_prefix_caching else None
        self.scheduler = Scheduler(self.pool, self.tree, max_num_batched_tokens, max_num_seqs)
        static = StaticDecode(model, self.cache, max_num_seqs, self.max_model_len, scratch_block=num_blocks) if cuda_graphs else None
        self.runner = ModelRunner(model, self.cache, static, pad_block=num_blocks)
        self.requests: dict[str, Request] = {}
        self._arrival = itertools.count()
        self._seq_ids = itertools.count()
        self._rng = random.Random(seed)  # base seeds of unseeded requests
        self._metrics = Metrics()
        self._streaming: set[str] = set()  # ids of requests that get an output after every step
        self._running_step: Schedule | None = None  # the step in progress, for the rollback
        self._carried: list[RequestOutput] = []  # failed outputs of a step interrupted by a BaseException

    # ---------------------------------------------------------------------------- requests
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> None:
        """Raise ValueError naming what is wrong; called before anything is scheduled."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(prompt_token_ids, list) or not prompt_token_ids:
            raise ValueError("the prompt is empty" if isinstance(prompt_token_ids, list)
                             else f"prompt token ids must be a list of int, got {type(prompt_token_ids).__name__}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_token_ids):
            raise ValueError("prompt token ids must all be integers")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens does not fit the model's context of "
                             f"{self.max_model_len} tokens (it must leave room for one generated token)")
        params.check_vocab(self.vocab_size)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        total = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        need = -(-total // self.pool.block_size) + 1
        if need > self.pool.num_blocks:
            raise ValueError(f"a sequence of {total} tokens needs {need} KV blocks but the pool has only "
                             f"{self.pool.num_blocks}: lower max_tokens or raise kv_cache_tokens")
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None, stream: bool = False, validated: bool = False) -> str:
        """stream=True: step() returns an output for this request after every step that gave it
        new tokens (text decoded incrementally), not only when a sample finishes. validated=True:
        the front door the caller entered (LLM.generate, AsyncLLM.submit) already ran validate()."""
        if not validated:
            self.validate(prompt_token_ids, params, request_id)
        arrival = next(self._arrival)
        rid = request_id if request_id is not None else f"req-{arrival}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        base = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(rid, prompt, list(prompt_token_ids), params, arrival, base, forked=params.n == 1,
                      stream=bool(stream))
        req.seqs.append(self._new_seq(req, 0, list(prompt_token_ids)))
        self.requests[rid] = req
        if req.stream:
            self._streaming.add(rid)
        self.scheduler.add(req.seqs[0])
        self._metrics.requests += 1
        self._metrics.prompt_tokens += len(prompt_token_ids)
        return rid

    def _new_seq(self, req: Request, index: int, tokens: list[int]) -> Sequence:
        seq = Sequence(next(self._seq_ids), req, index, sample_seed(req.base_seed, index), tokens,
                       len(req.prompt_token_ids))
        if req.params.logprobs is not None or req.params.logprob_token_ids:
            seq.logprobs = []
        if req.params.stop or (req.stream and self.tokenizer is not None):
            seq.detok = IncrementalDetokenizer(self.tokenizer)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop every unfinished sample of the request and free its blocks; returns its final
        output (finish_reason "abort" on the samples it stopped), None if it is unknown or done.
        A request failed by an interrupted step (see "Failed steps") is handed back once more:
        its error output, no longer carried to the next step()."""
        req = self.requests.get(request_id)
        if req is None:
            for i, out in enumerate(self._carried):
                if out.request_id == request_id:
                    return self._carried.pop(i)
            return None
        self._forget(req)
        for seq in req.seqs:
            if seq.status is not Status.FINISHED:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._final_output(req)

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        self._streaming.discard(req.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests or self._carried)

    # -------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """One batch. Returns an output for every request that had a sample finish in this step
        (RequestOutput.finished once all n are done), and for every streaming request that got
        tokens. Raises StepError when the step failed (rolled back; see "Failed steps")."""
        carried, self._carried = self._carried, []
        try:
            outs = self._step()
        except _EngineStuck:
            raise
        except BaseException as e:
            failed = carried + self._roll_back(e)
            if not isinstance(e, Exception):
                self._carried = failed
                raise
            if not failed:
                raise  # nothing to blame: the caller decides whether to step again
            raise StepError(e, failed) from e
        return carried + outs

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        with phase("engine.schedule"):
            sched = self._running_step = self.scheduler.schedule()
        m = self._metrics
        m.steps += 1
        m.num_preemptions += sched.num_preempted
        m.cached_prefix_tokens += sched.cached_tokens
        m.num_deferred += sched.num_deferred
        if not sched.seqs:
            m.step_time_s += time.perf_counter() - t0
            self._running_step = self.scheduler.current = None
            if self.scheduler.waiting and not self.scheduler.running:
                # cannot happen when add_request's fit check holds; fail loudly rather than spin
                raise _EngineStuck(f"engine stuck: {len(self.scheduler.waiting)} waiting sequences and none can be admitted")
            return []
        for s in sched.seqs:
            if s.seq.prefill_done and s.num_new == 1:
                m.decode_tokens_computed += 1
            else:
                m.prefill_tokens_computed += s.num_new
        with phase("engine.forward"):
            logits, index = self.runner.run(sched)
        # one sample per sampling sequence, n for a leader whose prompt completes (the fork)
        wants: list[SampleRequest] = []
        owners: list[tuple[Sequence, int]] = []  # (sequence, sample index it receives)
        for s, row in zip(sched.seqs, index):
            if row < 0:
                continue
            seq, req = s.seq, s.seq.request
            if not req.forked:
                for i in range(req.params.n):
                    wants.append(SampleRequest(row, req.params, sample_seed(req.base_seed, i), 0))
                    owners.append((seq, i))
            else:
                wants.append(SampleRequest(row, req.params, seq.seed, seq.num_generated))
                owners.append((seq, seq.index))
        with phase("engine.sample"):
            results = sample(logits, wants, self.sampler_backend) if wants else []
        self.scheduler.step_done(sched)
        failed = self._fail_bad_logits(owners, results)
        if failed:  # their samples are meaningless: no fork, no token for them
            kept = [k for k, (seq, _) in enumerate(owners) if seq.request.request_id not in failed]
            owners, results = [owners[k] for k in kept], [results[k] for k in kept]
        # fork first (siblings copy the leader's blocks), then append and stop: a leader that
        # finishes at once (max_tokens=1) must not release its blocks before its siblings share them
        targets = [self._fork(seq, i) if i != seq.index else seq for seq, i in owners]
        for seq, _ in owners:
            seq.request.forked = True
        touched: dict[str, Request] = dict(failed)
        for seq, res in zip(targets, results):
            seq.prefill_done = True
            self._append(seq, res)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                touched[seq.request.request_id] = seq.request
        if self._streaming:  # only requests that asked for streaming get an output every step
            for seq in targets:
                if seq.request.stream:
                    touched.setdefault(seq.request.request_id, seq.request)
        m.step_time_s += time.perf_counter() - t0
        outs = [self._output(req, finished=req.finished) for req in touched.values()]
        for req in touched.values():
            if req.finished:
                self._forget(req)
        self._running_step = None
        return outs

    def _roll_back(self, error: BaseException) -> list[RequestOutput]:
        """Undo what a failed step left visible (see "Failed steps"); returns the failed outputs."""
        sched = self._running_step or self.scheduler.current
        self._running_step = self.scheduler.current = None
        if self.tree is not None:
            self.tree.drop_in_flight()
        failed: dict[int, Request] = {}
        for seq in sched.touched if sched is not None else []:
            failed.setdefault(id(seq.request), seq.request)
        message = f"{type(error).__name__}: {error}"
        outs = []
        for req in failed.values():
            for seq in req.seqs:
                if seq.status is not Status.FINISHED:
                    seq.finish_reason = "error"
                    self.scheduler.drop(seq)
            self._forget(req)
            out = self._final_output(req)
            out.error = message
            outs.append(out)
        self._metrics.failed_steps += 1
        self._metrics.failed_requests += len(outs)
        try:
            self.check()
        except AssertionError as bad:
            raise RuntimeError(f"the engine could not roll back a failed step ({message}): {bad}; "
                               "it must not be used further") from bad
        return outs

    def _fail_bad_logits(self, owners: list[tuple[Sequence, int]], results: list) -> dict[str, Request]:
        """Fail every request with a sample whose logits row was NaN/inf (flagged by the sampler
        with the step's one sync): its samples finish with "error" and RequestOutput.error says
        why; the step itself succeeds and the rest of the batch goes on (unlike a step that raises,
        see "Failed steps"). The full blocks it inserted into the prefix tree stay there: a request
        with the same prefix computes the same NaN and fails the same way. A sample whose sampling
        values the sampler rejected (res.error) fails its request the same way."""
        failed: dict[str, Request] = {}
        for (seq, _), res in zip(owners, results):
            req = seq.request
            if (res.bad_logits or res.error) and req.request_id not in failed:
                failed[req.request_id] = req
                what = (f"its sampling values were rejected: {res.error}" if res.error else
                        f"the model's logits for sample {seq.index} at generated token {seq.num_generated} hold "
                        f"NaN or +inf (or are all -inf)")
                req.error = f"request {req.request_id!r}: {what}; the request was stopped, the rest of the batch goes on"
                held = {b for s in req.seqs for b in s.block_table}
                for s in req.seqs:
                    if s.status is not Status.FINISHED:
                        s.finish_reason = "error"
                        self.scheduler.drop(s)  # its NaN tail does not go into the prefix tree
                # its KV may hold NaN: clear the blocks it freed, so that a later owner's reads
                # past its own length (the torch backend's masked gathers) see zeros, not NaN
                freed = sorted(b for b in held if self.pool.ref_counts[b] == 0)
                if freed:
                    idx = torch.tensor(freed, dtype=torch.int64).to(self.cache.k.device, non_blocking=True)
                    self.cache.k[:, idx] = 0
                    self.cache.v[:, idx] = 0
                req.forked = True  # no fork will come: the request is finished
                self._metrics.failed_requests += 1
        return failed

    def _fork(self, leader: Sequence, index: int) -> Sequence:
        req = leader.request
        sib = self._new_seq(req, index, list(req.prompt_token_ids))
        sib.num_computed = leader.num_computed
        sib.block_table = list(leader.block_table)
        for b in sib.block_table:
            self.pool.incref(b)
        sib.tree_node, sib.num_tree_blocks = leader.tree_node, leader.num_tree_blocks
        sib.prefill_done = True
        req.seqs.append(sib)
        self.scheduler.add_running(sib)
        return sib

    def _append(self, seq: Sequence, res) -> None:
        p = seq.request.params
        tok = res.token
        seq.tokens.append(tok)
        seq.cumulative_logprob += res.logprob
        seq.sampling_logprobs.append(res.logprob)
        if seq.logprobs is not None:
            seq.logprobs.append(res.extra)
        self._metrics.generated_tokens += 1
        if tok in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
        elif not p.ignore_eos and tok in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif seq.detok is not None and self._hit_stop_string(seq, seq.detok.add(tok)):
            pass
        elif seq.num_generated >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            seq.finish_reason = "length"

    def _hit_stop_string(self, seq: Sequence, new_text: str) -> bool:
        if not new_text:
            return False
        text = seq.detok.text
        p = seq.request.params
        for s in p.stop:
            # a stop string can only end inside the new text
            at = text.find(s, max(0, len(text) - len(new_text) - len(s) + 1))
            if at >= 0:
                seq.finish_reason, seq.stop_reason = "stop", s
                seq.stop_text = text[:at + len(s)] if p.include_stop_str_in_output else text[:at]
                return True
        return False

    def _output(self, req: Request, finished: bool, with_text: bool = True) -> RequestOutput:
        outs = []
        n = req.params.n
        seqs = sorted(req.seqs, key=lambda s: s.index)
        for i in range(n):
            seq = seqs[i] if i < len(seqs) else None
            if seq is None:  # aborted (or failed) before the fork
                reason = "error" if seqs[0].finish_reason == "error" else "abort"
                outs.append(CompletionOutput(i, "", [], reason, 0.0, [] if seqs[0].logprobs is not None else None))
                continue
            gen = seq.tokens[seq.prompt_len:]
            if not with_text:
                text = ""
            elif seq.stop_text is not None:
                text = seq.stop_text
            elif seq.finish_reason is None and seq.detok is not None:
                text = seq.detok.text  # unfinished (a streaming snapshot): no full decode every step
            elif self.tokenizer is not None:
                text = self.tokenizer.decode(gen, skip_special_tokens=True)
            else:
                text = ""
            outs.append(CompletionOutput(i, text, gen, seq.finish_reason, seq.cumulative_logprob,
                                         list(seq.logprobs) if seq.logprobs is not None else None, seq.stop_reason,
                                         list(seq.sampling_logprobs)))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished, req.num_cached_tokens,
                             req.error)

    def _final_output(self, req: Request) -> RequestOutput:
        """The output of a request that leaves the engine by abort or failure: it must come out
        even if decoding its text fails (then without text, the failure in .error)."""
        try:
            return self._output(req, finished=True)
        except Exception as e:
            out = self._output(req, finished=True, with_text=False)
            out.error = f"decoding the output failed: {type(e).__name__}: {e}"
            return out

    # ---------------------------------------------------------------------------- metrics
    def metrics(self) -> dict:
        return self._metrics.as_dict(self.pool.peak_used, self.pool.num_blocks, self.pool.num_used)

    def reset_metrics(self) -> None:
        self._metrics = Metrics()
        self.pool.peak_used = self.pool.num_used

    def invalidate_prefix_cache(self) -> None:
        """Forget all cached KV (call after the weights change). Requests in flight would mix
        old and new KV, so this refuses while any runs."""
        if self.has_unfinished():
            raise RuntimeError("invalidate_prefix_cache() while requests are running; finish or abort them first")
        if self.tree is not None:
            self.tree.reset()

    def check(self) -> None:
        """Debug invariants of the cache (tests call this)."""
        self.scheduler.check()
