"""The scheduler alone (no model): token budget and chunked prefill, followers wait one step for
a leader computing their prefix, copy-on-write of shared partial blocks, preemption by recompute."""
from __future__ import annotations

from rrm_engine.cache.block_pool import BlockPool
from rrm_engine.cache.radix_cache import RadixCache
from rrm_engine.sampling_params import SamplingParams
from rrm_engine.core.scheduler import Scheduler
from rrm_engine.core.sequence import Request, Sequence, Status

BS = 4


def make_seq(i: int, tokens: list[int]) -> Sequence:
    req = Request(f"r{i}", None, list(tokens), SamplingParams(), arrival=i, base_seed=0, forked=True)
    seq = Sequence(i, req, 0, 0, list(tokens), len(tokens))
    req.seqs.append(seq)
    return seq


def run_step(sched: Scheduler, sampled_token: int = 9):
    """What the engine does after the model ran: advance, then append a token to finished prefills."""
    s = sched.schedule()
    sched.step_done(s)
    for x in s.seqs:
        if x.seq.num_computed == len(x.seq.tokens):
            x.seq.tokens.append(sampled_token)
            x.seq.prefill_done = True
    sched.check()
    return s


def test_chunked_prefill_respects_the_budget_and_mixes_with_decode():
    pool = BlockPool(32, BS)
    sched = Scheduler(pool, RadixCache(pool), max_num_batched_tokens=10, max_num_seqs=8)
    a, b = make_seq(0, list(range(100, 106))), make_seq(1, list(range(200, 225)))
    sched.add(a)
    sched.add(b)
    s = run_step(sched)
    assert [(x.seq, x.num_new) for x in s.seqs] == [(a, 6), (b, 4)]
    s = run_step(sched)  # a decodes one token, b gets the rest of the budget
    assert [(x.seq, x.num_new) for x in s.seqs] == [(a, 1), (b, 9)]
    assert sum(x.num_new for x in run_step(sched).seqs) == 10


def test_followers_wait_for_the_leader_then_share_its_blocks():
    pool = BlockPool(32, BS)
    sched = Scheduler(pool, RadixCache(pool), max_num_batched_tokens=100, max_num_seqs=8)
    prefix = list(range(100, 110))  # 2 full blocks + 2 tokens
    lead, follow = make_seq(0, prefix + [1, 2, 3]), make_seq(1, prefix + [5])
    sched.add(lead)
    sched.add(follow)
    s = run_step(sched)
    assert [x.seq for x in s.seqs] == [lead] and s.num_deferred == 1
    s = run_step(sched)
    assert [(x.seq, x.num_new) for x in s.seqs] == [(lead, 1), (follow, 1)] and s.cached_tokens == 10
    assert follow.block_table[:2] == lead.block_table[:2]
    # the follower matched 2 tokens of the leader's third block: it wrote into a private copy
    assert s.copies == [(lead.block_table[2], follow.block_table[2])]


def test_preemption_frees_the_newest_and_requeues_it():
    pool = BlockPool(4, BS)
    sched = Scheduler(pool, None, max_num_batched_tokens=100, max_num_seqs=8)
    old, new = make_seq(0, [1] * 8), make_seq(1, [2] * 8)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # 2 full blocks each, plus a sampled token
    s = run_step(sched)  # each needs a third block: only one can have it
    assert s.num_preempted == 1 and [x.seq for x in s.seqs] == [old]
    assert new.status is Status.WAITING and new.block_table == [] and new.tokens == [2] * 8 + [9]
    while old.num_generated < 4:
        run_step(sched)
    sched.finish(old)
    s = run_step(sched)  # the preempted one recomputes prompt + generated token
    assert [(x.seq, x.num_new) for x in s.seqs] == [(new, 9)]
    assert pool.num_used == len(new.block_table)
