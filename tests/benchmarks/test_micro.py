"""pytest-benchmark microbenchmarks of CPU-side hot pieces: a scheduler decode step, a radix-tree
match, the reference sampler. They run only with `--benchmark-only` (normal runs skip them):

    PYTHONPATH=. python -m pytest tests/benchmarks --benchmark-only

Each benchmark also checks its result, so a broken piece fails instead of timing garbage."""
from __future__ import annotations

import pytest
import torch

from rrm_kernels.sampling import sample_ref
from rrm_engine.cache.block_pool import BlockPool
from rrm_engine.cache.radix_cache import RadixCache
from rrm_engine.sampling_params import SamplingParams
from rrm_engine.core.scheduler import Scheduler
from rrm_engine.core.sequence import Request, Sequence

BS = 16


@pytest.fixture(autouse=True)
def _only_with_benchmark_only(request):
    if not request.config.getoption("benchmark_only", False):
        pytest.skip("microbenchmark: run with --benchmark-only")


def _decoding_scheduler(num_seqs: int, prompt_len: int) -> tuple[Scheduler, list[Sequence]]:
    """num_seqs sequences with their prompts prefilled, ready to decode (shared query prefix)."""
    pool = BlockPool(num_seqs * (prompt_len + 512) // BS + 64, BS)
    sched = Scheduler(pool, RadixCache(pool), max_num_batched_tokens=num_seqs * prompt_len, max_num_seqs=num_seqs)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 49152, (prompt_len // 2,), generator=g).tolist()
    seqs = []
    for i in range(num_seqs):
        tokens = shared + torch.randint(0, 49152, (prompt_len - len(shared),), generator=g).tolist()
        req = Request(f"r{i}", None, tokens, SamplingParams(max_tokens=512), i, i)
        seq = Sequence(i, req, 0, i, list(tokens), len(tokens))
        req.seqs.append(seq)
        sched.add(seq)
        seqs.append(seq)
    while sched.waiting:  # followers of the shared prefix wait one step for their leader
        _step(sched)
    return sched, seqs


def _step(sched: Scheduler) -> int:
    out = sched.schedule()
    sampling = [s.seq for s in out.seqs if s.samples]  # read before step_done advances num_computed
    sched.step_done(out)
    for seq in sampling:
        seq.prefill_done = True
        seq.tokens.append(7)
    return len(out.seqs)


def test_scheduler_decode_step(benchmark):
    sched, _ = _decoding_scheduler(64, 512)
    assert benchmark.pedantic(_step, args=(sched,), rounds=200, iterations=1, warmup_rounds=5) == 64
    sched.check()


def test_radix_match(benchmark):
    pool = BlockPool(4096, BS)
    tree = RadixCache(pool)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 49152, (256,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 49152, (256,), generator=g).tolist() for _ in range(32)]
    for p in prompts:  # insert every full block of every prompt, as the scheduler does
        node = tree.root
        for j in range(len(p) // BS):
            b = pool.allocate()
            node = tree.insert_full(node, tuple(p[j * BS:(j + 1) * BS]), b)
            pool.decref(b)  # the tree holds it now
    tree.mark_computed()
    query = prompts[5][:400] + [1, 2, 3]
    m = benchmark.pedantic(tree.match, args=(query, len(query) - 1), rounds=500, iterations=1, warmup_rounds=5)
    assert m.num_tokens == 400


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_reference(benchmark, top_p):
    b, v = 16, 49152
    logits = torch.randn(b, v, generator=torch.Generator().manual_seed(0))
    rows = torch.arange(b)
    args = (logits, rows, torch.full((b,), 0.6), torch.zeros(b, dtype=torch.int32), torch.full((b,), top_p),
            torch.zeros(b), torch.arange(b, dtype=torch.int64), torch.zeros(b, dtype=torch.int64))
    tokens, logprobs = benchmark.pedantic(sample_ref, args=args, rounds=5, iterations=1, warmup_rounds=1)
    assert tokens.shape == (b,) and bool((tokens < v).all()) and bool((logprobs <= 0).all())
