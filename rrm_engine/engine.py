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
"""
from __future__ import annotations

import itertools
import random
import time

import torch

from .attention import KVCache
from .block_pool import BlockPool
from .decode_graphs import StaticDecode
from .detokenizer import IncrementalDetokenizer
from .metrics import Metrics
from .profiling import phase
from .model import Decoder
from .outputs import CompletionOutput, RequestOutput
from .radix_cache import RadixCache
from .runner import ModelRunner
from .sampler import SampleRequest, check_backend, sample, sample_seed
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Request, Sequence, Status


class Engine:
    def __init__(self, model: Decoder, tokenizer, eos_token_ids: tuple[int, ...], *, num_blocks: int,
                 block_size: int = 16, enable_prefix_caching: bool = True, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, seed: int = 0, cuda_graphs: bool = False, sampler_backend: str = "auto"):
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
            from kernels.csrc_ops import load
            load()  # JIT-build it now (about a minute, once per machine), not inside the first step
        # tensor-parallel shards hold fewer heads: size the cache from the module, not the config
        kv_heads = model.model.layers[0].self_attn.qkv_proj.part_sizes[1] // cfg.head_dim
        # one block more than the pool hands out: the scratch block that padded decode rows write to
        self.cache = KVCache.allocate(cfg.num_layers, num_blocks + 1, block_size, kv_heads, cfg.head_dim, p.dtype, p.device)
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
                    prompt: str | None = None) -> str:
        self.validate(prompt_token_ids, params, request_id)
        arrival = next(self._arrival)
        rid = request_id if request_id is not None else f"req-{arrival}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        base = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(rid, prompt, list(prompt_token_ids), params, arrival, base, forked=params.n == 1)
        req.seqs.append(self._new_seq(req, 0, list(prompt_token_ids)))
        self.requests[rid] = req
        self.scheduler.add(req.seqs[0])
        self._metrics.requests += 1
        self._metrics.prompt_tokens += len(prompt_token_ids)
        return rid

    def _new_seq(self, req: Request, index: int, tokens: list[int]) -> Sequence:
        seq = Sequence(next(self._seq_ids), req, index, sample_seed(req.base_seed, index), tokens,
                       len(req.prompt_token_ids))
        if req.params.logprobs is not None or req.params.logprob_token_ids:
            seq.logprobs = []
        if req.params.stop:
            seq.detok = IncrementalDetokenizer(self.tokenizer)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop every unfinished sample of the request and free its blocks; returns its final
        output (finish_reason "abort" on the samples it stopped), None if it is unknown or done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if seq.status is not Status.FINISHED:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._output(req, finished=True)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """One batch. Returns an output for every request that had a sample finish in this step
        (RequestOutput.finished once all n are done)."""
        t0 = time.perf_counter()
        with phase("engine.schedule"):
            sched = self.scheduler.schedule()
        m = self._metrics
        m.steps += 1
        m.num_preemptions += sched.num_preempted
        m.cached_prefix_tokens += sched.cached_tokens
        m.num_deferred += sched.num_deferred
        if not sched.seqs:
            m.step_time_s += time.perf_counter() - t0
            if self.scheduler.waiting and not self.scheduler.running:
                # cannot happen when add_request's fit check holds; fail loudly rather than spin
                raise RuntimeError(f"engine stuck: {len(self.scheduler.waiting)} waiting sequences and none can be admitted")
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
        m.step_time_s += time.perf_counter() - t0
        outs = []
        for req in touched.values():
            if req.finished:
                del self.requests[req.request_id]
            outs.append(self._output(req, finished=req.finished))
        return outs

    def _fail_bad_logits(self, owners: list[tuple[Sequence, int]], results: list) -> dict[str, Request]:
        """Fail every request with a sample whose logits row was NaN/inf (flagged by the sampler
        with the step's one sync): its samples finish with "error" and RequestOutput.error says
        why; the rest of the batch goes on."""
        failed: dict[str, Request] = {}
        for (seq, _), res in zip(owners, results):
            req = seq.request
            if res.bad_logits and req.request_id not in failed:
                failed[req.request_id] = req
                req.error = (f"request {req.request_id!r}: the model's logits for sample {seq.index} at generated "
                             f"token {seq.num_generated} hold NaN or +inf (or are all -inf); the request was "
                             f"stopped, the rest of the batch goes on")
                held = {b for s in req.seqs for b in s.block_table}
                for s in req.seqs:
                    if s.status is not Status.FINISHED:
                        s.finish_reason = "error"
                        self.scheduler.finish(s)
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

    def _output(self, req: Request, finished: bool) -> RequestOutput:
        outs = []
        n = req.params.n
        seqs = sorted(req.seqs, key=lambda s: s.index)
        for i in range(n):
            seq = seqs[i] if i < len(seqs) else None
            if seq is None:  # aborted (or failed) before the fork
                outs.append(CompletionOutput(i, "", [], "error" if req.error else "abort", 0.0,
                                             [] if seqs[0].logprobs is not None else None))
                continue
            gen = seq.tokens[seq.prompt_len:]
            if seq.stop_text is not None:
                text = seq.stop_text
            elif self.tokenizer is not None:
                text = self.tokenizer.decode(gen, skip_special_tokens=True)
            else:
                text = ""
            outs.append(CompletionOutput(i, text, gen, seq.finish_reason, seq.cumulative_logprob,
                                         list(seq.logprobs) if seq.logprobs is not None else None, seq.stop_reason,
                                         list(seq.sampling_logprobs)))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished, req.num_cached_tokens,
                             req.error)

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
