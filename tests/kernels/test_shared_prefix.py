import pytest
import torch

from rrm_kernels.paged_decode import paged_decode_attention
from rrm_kernels.shared_prefix_decode import shared_prefix_decode_attention, shared_prefix_decode_attention_ref
from rrm_engine.layers.attention import PrefixLevel

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def two_level_batch(page: int, votes: int, gen: torch.Generator):
    """A query prefix (2 blocks) shared by two comparisons; comparison 0 (1 block) shared by
    `votes` sequences, comparison 1 (2 blocks) by 2 sequences; one sequence under the query
    prefix only, one with no shared prefix. Returns (block_tables, seq_lens, level0, level1)."""
    q_blocks, c_blocks = [0, 1], [[2], [3, 4]]
    groups = [(0, 0)] * votes + [(0, 1)] * 2 + [(0, -1), (-1, -1)]
    next_block = 5
    tables, lens = [], []
    for g0, g1 in groups:
        shared = (q_blocks if g0 >= 0 else []) + (c_blocks[g1] if g1 >= 0 else [])
        suffix = int(torch.randint(1, 2 * page + 1, (1,), generator=gen))  # >= 1 token of its own
        own = -(-suffix // page)
        tables.append(shared + list(range(next_block, next_block + own)))
        next_block += own
        lens.append(len(shared) * page + suffix)
    width = max(len(t) for t in tables) + 1
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    level0 = PrefixLevel(torch.tensor([q_blocks], dtype=torch.int32), torch.tensor([2 * page], dtype=torch.int32),
                         torch.tensor([g0 for g0, _ in groups], dtype=torch.int32))
    level1 = PrefixLevel(torch.tensor([c_blocks[0] + [0], c_blocks[1]], dtype=torch.int32),
                         torch.tensor([page, 2 * page], dtype=torch.int32),
                         torch.tensor([g1 for _, g1 in groups], dtype=torch.int32))
    return bt, seq_lens, level0, level1, next_block


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hkv,g,d,page", [(2, 1, 16, 8), (1, 4, 32, 16), (1, 7, 64, 16)])
def test_shared_prefix_equals_plain_decode(dtype, hkv, g, d, page):
    gen = torch.Generator().manual_seed(hkv * 1000 + g * 100 + d + page)
    bt, seq_lens, level0, level1, nb = two_level_batch(page, votes=3, gen=gen)
    kc = torch.randn(nb, page, hkv, d, generator=gen).to(dtype)
    vc = torch.randn(nb, page, hkv, d, generator=gen).to(dtype)
    q = torch.randn(bt.shape[0], hkv * g, d, generator=gen).to(dtype)
    plain = paged_decode_attention(q, kc, vc, bt, seq_lens, d ** -0.5)
    for levels in ([level0], [level0, level1]):
        out = shared_prefix_decode_attention(q, kc, vc, bt, seq_lens, levels, d ** -0.5)
        ref = shared_prefix_decode_attention_ref(q, kc, vc, bt, seq_lens, levels, d ** -0.5)
        torch.testing.assert_close(out, ref, **TOL[dtype])
        torch.testing.assert_close(out, plain, **TOL[dtype])


def test_group_larger_than_one_row_tile_and_tuple_levels():
    # 12 votes x 7 heads = 84 rows > one 64-row tile: the prefix pass loops over row chunks
    gen = torch.Generator().manual_seed(5)
    page, hkv, g, d = 8, 1, 7, 16
    bt, seq_lens, level0, level1, nb = two_level_batch(page, votes=12, gen=gen)
    kc = torch.randn(nb, page, hkv, d, generator=gen)
    vc = torch.randn(nb, page, hkv, d, generator=gen)
    q = torch.randn(bt.shape[0], hkv * g, d, generator=gen)
    levels = [(lv.block_tables, lv.lens, lv.seq_group) for lv in (level0, level1)]
    out = shared_prefix_decode_attention(q, kc, vc, bt, seq_lens, levels, 0.25)
    torch.testing.assert_close(out, paged_decode_attention(q, kc, vc, bt, seq_lens, 0.25), atol=1e-5, rtol=1e-5)


def test_reference_reads_the_levels_not_the_sequence_tables():
    # the reference must depend on the group tables: pointing a group at other blocks changes it
    gen = torch.Generator().manual_seed(6)
    bt, seq_lens, level0, _, nb = two_level_batch(8, votes=2, gen=gen)
    kc = torch.randn(nb, 8, 1, 16, generator=gen)
    q = torch.randn(bt.shape[0], 2, 16, generator=gen)
    moved = PrefixLevel(level0.block_tables + 2, level0.lens, level0.seq_group)
    a = shared_prefix_decode_attention_ref(q, kc, kc, bt, seq_lens, [level0], 0.25)
    b = shared_prefix_decode_attention_ref(q, kc, kc, bt, seq_lens, [moved], 0.25)
    assert (a - b).abs().max() > 1e-3
    out = shared_prefix_decode_attention(q, kc, kc, bt, seq_lens, [moved], 0.25)
    torch.testing.assert_close(out, b, atol=1e-5, rtol=1e-5)


def test_shared_prefix_rejects_bad_levels():
    gen = torch.Generator().manual_seed(7)
    bt, seq_lens, level0, _, nb = two_level_batch(8, votes=2, gen=gen)
    kc = torch.randn(nb, 8, 1, 16, generator=gen)
    q = torch.randn(bt.shape[0], 1, 16, generator=gen)
    with pytest.raises(ValueError, match="whole blocks"):
        shared_prefix_decode_attention(q, kc, kc, bt, seq_lens,
                                       [PrefixLevel(level0.block_tables, level0.lens - 1, level0.seq_group)], 1.0)
    with pytest.raises(ValueError, match="seq_group"):
        shared_prefix_decode_attention(q, kc, kc, bt, seq_lens,
                                       [PrefixLevel(level0.block_tables, level0.lens, level0.seq_group[:-1])], 1.0)
    with pytest.raises(ValueError, match="seq_group"):
        shared_prefix_decode_attention(q, kc, kc, bt, seq_lens,
                                       [PrefixLevel(level0.block_tables, level0.lens, level0.seq_group + 1)], 1.0)
    with pytest.raises(ValueError, match="block_tables, lens, seq_group"):
        shared_prefix_decode_attention(q, kc, kc, bt, seq_lens, [(level0.block_tables, level0.lens)], 1.0)
