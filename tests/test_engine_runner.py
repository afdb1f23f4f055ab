"""The runner's packing: positions / slots / rows of a mixed prefill + decode step (decode rows
first), and the prefix tree of shared blocks it hands to the shared-prefix kernels."""
from __future__ import annotations

import torch

from rrm_engine.layers.attention import KVCache
from rrm_engine.core.runner import ModelRunner
from rrm_engine.sampling_params import SamplingParams
from rrm_engine.core.scheduler import Schedule, ScheduledSeq
from rrm_engine.core.sequence import Request, Sequence

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
    # the decode row is packed first (the decode kernels take the leading num_decode rows)
    assert ids.tolist() == [9, 2, 3, 4, 5] and meta.num_decode == 1
    assert meta.positions.tolist() == [9, 2, 3, 4, 5]
    assert meta.slot_mapping.tolist() == [5 * 4 + 1, 7 * 4 + 2, 7 * 4 + 3, 3 * 4, 3 * 4 + 1]
    assert meta.query_start_loc.tolist() == [0, 1, 5] and meta.seq_lens.tolist() == [10, 6]
    assert meta.block_tables.tolist() == [[9, 4, 5], [7, 3, 0]]
    assert rows == [4, 0]  # in schedule order: a's last token is packed row 4, b's row 0
    assert meta.prefix_levels == []  # a single decode row shares nothing
    dec, pre = meta.decode_part(), meta.prefill_part()
    assert dec.query_lens_host == [1] and dec.block_tables.tolist() == [[9, 4, 5]]
    assert pre.query_start_loc.tolist() == [0, 4] and pre.seq_lens.tolist() == [6]


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


def rrm_batch(queries: int, comparisons: int, votes: int):
    """Decode rows laid out like RRM judging: a 1-block system prompt shared by all, a query block
    per query, a comparison block (2 for comparison 1) per comparison, one own block per vote."""
    rows, expect, block = [], [], 100
    for qi in range(queries):
        q_block = 10 + qi
        for ci in range(comparisons):
            r = request(len(expect))
            c_blocks = [block + j for j in range(1 + (ci == 1))]
            block += len(c_blocks)
            for v in range(votes):
                table = [1, q_block] + c_blocks + [block]
                block += 1
                rows.append(seq(r, v, table, (len(table) - 1) * BS + 2, (len(table) - 1) * BS + 1))
                expect.append((qi, len(expect) // votes, c_blocks))
    return rows, expect


def test_prefix_tree_two_queries_three_levels():
    """Issue 13 D2: with two queries in flight the levels are system prompt (every row), the
    query's prompt (every pair of that query), the comparison's prompt (its votes)."""
    rows, expect = rrm_batch(queries=2, comparisons=2, votes=3)
    _, meta, _ = runner().build(Schedule([ScheduledSeq(s, 1) for s in rows]))
    l0, l1, l2 = meta.prefix_levels
    assert l0.seq_group.tolist() == [0] * 12 and l0.block_tables.tolist() == [[1]] and l0.lens.tolist() == [BS]
    assert l1.seq_group.tolist() == [q for q, _, _ in expect]
    assert l1.block_tables.tolist() == [[10], [11]] and l1.lens.tolist() == [BS, BS]
    assert l2.seq_group.tolist() == [c for _, c, _ in expect]
    assert l2.host.block_tables == [[100], [104, 105], [109], [113, 114]] == [b for _, _, b in expect[::3]]
    assert l2.lens.tolist() == [BS, 2 * BS, BS, 2 * BS]


def test_prefix_tree_one_query_joins_system_and_query():
    rows, expect = rrm_batch(queries=1, comparisons=3, votes=2)
    _, meta, _ = runner().build(Schedule([ScheduledSeq(s, 1) for s in rows]))
    l0, l1 = meta.prefix_levels
    assert l0.host.block_tables == [[1, 10]] and l0.host.seq_group == [0] * 6
    assert l1.host.seq_group == [c for _, c, _ in expect] and l1.host.lens == [BS, 2 * BS, BS]


def test_prefix_tree_depth_is_capped():
    from rrm_engine.core.runner import prefix_tree
    # four nested shared runs: rows 0-3 share [1], 0-2 [2], 0-1 [3]; rows 0-1 then 4 blocks each
    tables = [[1, 2, 3, 7, 9], [1, 2, 3, 7, 8], [1, 2, 4, 5], [1, 6, 0]]
    limits = [4, 4, 3, 2]
    full = prefix_tree(tables, limits, BS, max_levels=5)
    assert [lv.seq_group for lv in full] == [[0, 0, 0, 0], [0, 0, 0, -1], [0, 0, -1, -1]]
    assert [lv.block_tables for lv in full] == [[[1]], [[2]], [[3, 7]]]
    capped = prefix_tree(tables, limits, BS, max_levels=2)
    assert [lv.seq_group for lv in capped] == [[0, 0, 0, 0], [0, 0, 0, -1]]
    assert prefix_tree([[1, 2], [3, 4]], [2, 2], BS) == []  # nothing shared, no level
