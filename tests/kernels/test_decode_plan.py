"""The decode plan (rrm_kernels/decode_plan.py): built once per step from host lists and reused by
every layer (issue 13 D1); work items split any group into programs of block_m / g members
(D2: groups larger than one tile); the static plan CUDA graphs read keeps split-K sized to the
step's real context and the cascade, and its reused buffers never leak one step into the next
(build item 3). Every output is checked against plain paged decode on the same batch."""
from __future__ import annotations

import pytest
import torch

from rrm_kernels.decode_plan import (HostLevel, StaticDecodePlan, choose_num_splits, decode_tile, plan_decode,
                                 split_len_for)
from rrm_kernels.paged_decode import paged_decode_attention_ref
from rrm_kernels.paged_tile import TileConfig
from rrm_kernels.shared_prefix_decode import decode_attention

PAGE, HKV, G, D = 8, 2, 2, 16


def batch(lens: list[int], shared: list[tuple[list[int], int]], gen: torch.Generator, layers: int = 2):
    """Caches of `layers` layers and block tables where each row starts with the blocks of the
    groups it belongs to: shared[r] = (blocks, n) puts the first n blocks of `blocks` at the head
    of row r's table. Returns (kcs, vcs, block_tables, seq_lens)."""
    nb = 1 + max((max(b) for b, _ in shared if b), default=0)
    tables = []
    for r, n_tok in enumerate(lens):
        blocks, n = shared[r]
        own = -(-n_tok // PAGE) - n
        tables.append(blocks[:n] + list(range(nb, nb + own)))
        nb += own
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    kcs = [torch.randn(nb, PAGE, HKV, D, generator=gen) for _ in range(layers)]
    vcs = [torch.randn(nb, PAGE, HKV, D, generator=gen) for _ in range(layers)]
    return kcs, vcs, bt, torch.tensor(lens, dtype=torch.int32)


def two_queries(gen):
    """Rows 0-3: query A (blocks 0, 1), rows 0-1 comparison A1 (block 2), rows 2-3 A2 (block 3);
    rows 4-5: query B (block 4), comparison B1 (blocks 5, 6); all share system block 7 first."""
    sysb = [7]
    heads = [sysb + [0, 1, 2], sysb + [0, 1, 2], sysb + [0, 1, 3], sysb + [0, 1, 3], sysb + [4, 5, 6], sysb + [4, 5, 6]]
    counts = [4, 4, 4, 4, 4, 4]
    lens = [4 * PAGE + n for n in (3, 9, 1, 16, 5, 12)]
    levels = [HostLevel([[7]], [PAGE], [0] * 6),
              HostLevel([[0, 1], [4]], [2 * PAGE, PAGE], [0, 0, 0, 0, 1, 1]),
              HostLevel([[2], [3], [5, 6]], [PAGE, PAGE, 2 * PAGE], [0, 0, 1, 1, 2, 2])]
    return lens, list(zip(heads, counts)), levels


def test_one_plan_serves_every_layer_and_equals_plain_decode():
    gen = torch.Generator().manual_seed(0)
    lens, shared, levels = two_queries(gen)
    kcs, vcs, bt, seq_lens = batch(lens, shared, gen)
    plan = plan_decode(6, HKV * G, HKV, D, PAGE, torch.device("cpu"), max_seq_len=max(lens), seq_lens=lens,
                       levels=levels)
    assert plan.cap.level_slots == 3 and plan.row_levels.tolist() == [3] * 4 + [3] * 2
    assert plan.kv_start.tolist() == [4 * PAGE] * 6  # suffixes start after system + query + comparison
    # one item per group here (each fits a tile): (group, first member, count, level)
    assert plan.items.tolist() == [[0, 0, 6, 0], [1, 6, 4, 1], [2, 10, 2, 1], [3, 12, 2, 2], [4, 14, 2, 2],
                                   [5, 16, 2, 2]]
    suffix = max(n - 4 * PAGE for n in lens)
    assert plan.split_len[0].item() == split_len_for(suffix, choose_num_splits(suffix, 6, HKV), decode_tile(PAGE).block_n)
    q = [torch.randn(6, HKV * G, D, generator=gen) for _ in kcs]
    for layer, (kc, vc) in enumerate(zip(kcs, vcs)):  # the same plan (and partial buffers) for each layer
        out = decode_attention(q[layer], kc, vc, bt, seq_lens, 0.3, plan)
        torch.testing.assert_close(out, paged_decode_attention_ref(q[layer], kc, vc, bt, seq_lens, 0.3),
                                   atol=1e-5, rtol=1e-5)


def test_group_larger_than_one_tile_is_split_into_items():
    # 21 members of one group with 16-row tiles of (member, head) rows: 8 members per item -> 3 items
    gen = torch.Generator().manual_seed(1)
    n = 21
    lens = [3 * PAGE + 1 + (r % 5) for r in range(n)]
    kcs, vcs, bt, seq_lens = batch(lens, [([0, 1, 2], 3)] * n, gen, layers=1)
    level = HostLevel([[0, 1, 2]], [3 * PAGE], [0] * n)
    tile = TileConfig(block_m=16, block_n=16, num_warps=4)
    plan = plan_decode(n, HKV * G, HKV, D, PAGE, torch.device("cpu"), max_seq_len=max(lens), seq_lens=lens,
                       levels=[level], tile=tile)
    assert plan.items.tolist() == [[0, 0, 8, 0], [0, 8, 8, 0], [0, 16, 5, 0]]
    q = torch.randn(n, HKV * G, D, generator=gen)
    out = decode_attention(q, kcs[0], vcs[0], bt, seq_lens, 0.3, plan)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, kcs[0], vcs[0], bt, seq_lens, 0.3),
                               atol=1e-5, rtol=1e-5)
    # the default tile of a group over 64 (member, head) rows is 128 rows: one item for 21 x 2
    wide = plan_decode(40, HKV * G, HKV, D, PAGE, torch.device("cpu"), max_seq_len=64, seq_lens=[25] * 40,
                       levels=[HostLevel([[0, 1, 2]], [3 * PAGE], [0] * 40)])
    assert wide.tile.block_m == 128 and wide.items.tolist() == [[0, 0, 40, 0]]


def test_static_plan_reused_across_steps_never_leaks_a_step_into_the_next():
    """One StaticDecodePlan, several steps of different shapes through the same buffers and the
    same grids (as CUDA graph replays would): each step equals plain decode, and a level or group
    a row had in an earlier step does not reach its output."""
    gen = torch.Generator().manual_seed(2)
    static = StaticDecodePlan(8, HKV * G, HKV, D, PAGE, max_seq_len=256, device=torch.device("cpu"))
    p = 8
    plan = static.view(p)
    assert plan.cap.splits == choose_num_splits(256, p, HKV) and plan.cap.level_slots == 3
    lens, shared, levels = two_queries(gen)
    steps = [
        (lens, shared, levels),
        (lens[:5], shared[:5], [HostLevel([[7, 0]], [2 * PAGE], [0, 0, 0, 0, -1])]),  # fewer rows, one level
        (lens, shared, []),  # no levels at all
        (lens, shared, levels[:2]),
    ]
    for step_lens, step_shared, step_levels in steps:
        kcs, vcs, bt, seq_lens = batch(step_lens, step_shared, gen, layers=1)
        b = len(step_lens)
        # pad to p rows the way StaticDecode does: one token in a scratch block
        scratch = kcs[0].shape[0]
        kc = torch.cat([kcs[0], torch.randn(1, PAGE, HKV, D, generator=gen)])
        vc = torch.cat([vcs[0], torch.randn(1, PAGE, HKV, D, generator=gen)])
        width = 256 // PAGE
        bt_p = torch.full((p, width), scratch, dtype=torch.int32)
        bt_p[:b, :bt.shape[1]] = bt
        lens_p = torch.cat([seq_lens, torch.ones(p - b, dtype=torch.int32)])
        static.fill(p, step_lens, step_levels)
        q = torch.randn(p, HKV * G, D, generator=gen)
        out = decode_attention(q, kc, vc, bt_p, lens_p, 0.3, plan)
        want = paged_decode_attention_ref(q[:b], kc, vc, bt_p[:b], seq_lens, 0.3)
        torch.testing.assert_close(out[:b], want, atol=1e-5, rtol=1e-5)
        assert plan.row_levels[:b].tolist() == [sum(lv.seq_group[r] >= 0 for lv in step_levels) for r in range(b)]


def test_static_plan_keeps_split_k_sized_to_the_real_context():
    """Issue 13 R2: under CUDA graphs the splits were sized for the model's whole context, so
    split-K was effectively off below 8K. The static plan's grid covers the model's context, but
    the split length a step writes comes from its real lengths."""
    static = StaticDecodePlan(4, 28, 4, 128, 16, max_seq_len=131072, device=torch.device("cpu"))
    plan = static.view(1)
    assert plan.cap.splits == 16  # the grid: enough programs for any context of one row
    static.fill(1, [3000])
    want_splits = choose_num_splits(3000, 1, 4)
    assert want_splits == 12 and plan.split_len[0].item() == split_len_for(3000, want_splits, 16)
    old = split_len_for(131072, 16, 16)  # what the graph used to get: one split covers any context below 8K
    assert old >= 8192 > 3000


def test_plan_rejects_levels_that_do_not_nest():
    with pytest.raises(ValueError, match="nest"):
        plan_decode(2, 4, 2, 16, PAGE, torch.device("cpu"), max_seq_len=40, seq_lens=[40, 40],
                    levels=[HostLevel([[0]], [PAGE], [0, -1]), HostLevel([[1]], [PAGE], [0, 0])])
