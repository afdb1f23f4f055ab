"""Every attention kernel gives its reference's result at any launch tile (the shapes
`bench.kernels --sweep` times on a GPU), and a bad tile is refused before launch."""
import pytest
import torch

from rrm_kernels.paged_decode import paged_decode_attention, paged_decode_attention_ref
from rrm_kernels.paged_prefill import paged_prefill_attention, paged_prefill_attention_ref
from rrm_kernels.paged_tile import TileConfig
from rrm_kernels.shared_prefix_decode import shared_prefix_decode_attention, shared_prefix_decode_attention_ref
from paged_data import make_cache, scattered_tables
from test_shared_prefix import two_level_batch

PAGE, HKV, G, D = 8, 2, 3, 32
TILES = [TileConfig(16, 16, 1), TileConfig(32, 64, 4), TileConfig(128, 32, 8)]  # tiles below and above a page


@pytest.mark.parametrize("tile", TILES)
def test_decode_and_prefill_at_any_tile(tile):
    gen = torch.Generator().manual_seed(tile.block_m + tile.block_n)
    lens, qlens = [1, 17, 70, 40], [1, 17, 3, 40]
    bt, nb = scattered_tables(lens, PAGE, gen)
    kc, vc = make_cache(nb, PAGE, HKV, D, torch.float32, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), HKV * G, D, generator=gen)
    for splits in (1, 3):
        out = paged_decode_attention(q, kc, vc, bt, seq_lens, 0.2, num_splits=splits, tile=tile)
        torch.testing.assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, seq_lens, 0.2), atol=1e-5, rtol=1e-5)
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(qlens), HKV * G, D, generator=gen)
    out = paged_prefill_attention(q, kc, vc, bt, qsl, seq_lens, 0.2, max(qlens), tile=tile)
    ref = paged_prefill_attention_ref(q, kc, vc, bt, qsl, seq_lens, 0.2, max(qlens))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tile", TILES)
def test_shared_prefix_at_any_tile(tile):
    gen = torch.Generator().manual_seed(tile.num_warps)
    bt, seq_lens, level0, level1, nb = two_level_batch(PAGE, votes=5, gen=gen)  # 5 x 3 heads: a 16-row tile loops
    kc, vc = make_cache(nb, PAGE, HKV, D, torch.float32, gen)
    q = torch.randn(bt.shape[0], HKV * G, D, generator=gen)
    out = shared_prefix_decode_attention(q, kc, vc, bt, seq_lens, [level0, level1], 0.2, tile=tile)
    ref = shared_prefix_decode_attention_ref(q, kc, vc, bt, seq_lens, [level0, level1], 0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tile,match", [(TileConfig(8, 16, 4), "block_m"), (TileConfig(16, 48, 4), "block_n"),
                                        (TileConfig(16, 16, 3), "num_warps")])
def test_bad_tile_is_refused(tile, match):
    gen = torch.Generator().manual_seed(0)
    bt, nb = scattered_tables([5], PAGE, gen)
    kc, vc = make_cache(nb, PAGE, HKV, D, torch.float32, gen)
    q = torch.randn(1, HKV * G, D, generator=gen)
    with pytest.raises(ValueError, match=f"tile {match} must"):
        paged_decode_attention(q, kc, vc, bt, torch.tensor([5], dtype=torch.int32), 0.2, tile=tile)
