"""The runner's packing: positions / slots / rows of a mixed prefill + decode step, and the two
shared-prefix levels it hands to the shared-prefix kernel."""
from __future__ import annotations

import torch

from rrm_engine.attention import KVCache
from rrm_engine.runner import ModelRunner
from rrm_engine.sampling_params import SamplingParams
from rrm_engine.scheduler import Schedule, ScheduledSeq
from rrm_engine.sequence import Request, Sequence

BS = 4


class NotTorchBackend:  # the levels are built only for backends that read them
    pass


class FakeModel:
    backend = NotTorchBackend()


def runner() -> ModelRunner:
    return ModelRunner(FakeModel(), KVCache.allocate(1, 64, BS, 1, 8, torch.float32, "cpu"))


def seq(req: Request, index: int, table: list[int], n_tokens: int, computed: int) -> Sequence:
    s = Sequence(index, req, index, 0, list(range(n_tokens)), 1, block_table=table, num_computed=computed)
    req.seqs.append(s)
    return s


def request(i: int) -> Request:
    return Request(f"r{i}", None, [1], SamplingParams(), i, 0)


def test_packing_of_a_mixed_step():
    r = request(0)
    a = seq(r, 0, [7, 3], 6, 2)  # prefill chunk: tokens 2..5
    b = seq(r, 1, [9, 4, 5], 10, 9)  # decode: token 9
    sched = Schedule([ScheduledSeq(a, 4), ScheduledSeq(b, 1)])
    ids, meta, rows = runner().build(sched)
    assert ids.tolist() == [2, 3, 4, 5, 9]
    assert meta.positions.tolist() == [2, 3, 4, 5, 9]
    assert meta.slot_mapping.tolist() == [7 * 4 + 2, 7 * 4 + 3, 3 * 4, 3 * 4 + 1, 5 * 4 + 1]
    assert meta.query_start_loc.tolist() == [0, 4, 5] and meta.seq_lens.tolist() == [6, 10]
    assert meta.block_tables.tolist() == [[7, 3, 0], [9, 4, 5]]
    assert rows == [3, 4] and meta.prefix_levels == []  # not a pure decode step


def test_two_prefix_levels_query_then_fork_group():
    r0, r1, r2 = request(0), request(1), request(2)
    # r0 and r1: two votes each; all four share blocks 10, 11 (the query); each request's votes
    # also share its prompt blocks; r2 is alone
    rows = [seq(r0, 0, [10, 11, 20, 21, 30], 19, 18), seq(r0, 1, [10, 11, 20, 21, 31], 19, 18),
            seq(r1, 0, [10, 11, 40, 32], 15, 14), seq(r1, 1, [10, 11, 40, 33], 15, 14),
            seq(r2, 0, [50, 51], 6, 5)]
    _, meta, _ = runner().build(Schedule([ScheduledSeq(s, 1) for s in rows]))
    l0, l1 = meta.prefix_levels
    assert l0.seq_group.tolist() == [0, 0, 0, 0, -1]
    assert l0.block_tables.tolist() == [[10, 11]] and l0.lens.tolist() == [8]
    assert l1.seq_group.tolist() == [0, 0, 1, 1, -1]
    assert l1.block_tables.tolist() == [[20, 21], [40, 0]] and l1.lens.tolist() == [8, 4]
