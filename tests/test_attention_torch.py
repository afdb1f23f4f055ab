"""The torch backend's cascade decode (shared prefixes read once per group) equals plain paged
decode on the same batch, on fresh random caches with one and two nested levels."""
from __future__ import annotations

import pytest
import torch

from rrm_engine.layers.attention import AttentionMetadata, KVCache, PrefixLevel, TorchAttention, merge_by_lse, attend_with_lse


def _batch(gen: torch.Generator, hkv: int, g: int, two_levels: bool):
    bs, d, num_blocks = 4, 8, 64
    cache = KVCache(torch.randn(1, num_blocks, bs, hkv, d, generator=gen),
                    torch.randn(1, num_blocks, bs, hkv, d, generator=gen))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    take = lambda n: [free.pop() for _ in range(n)]  # noqa: E731
    query_prefix = take(3)  # level 0: shared by rows 0-4
    prompt_a, prompt_b = take(2), take(1)  # level 1: rows 0-2 share prompt_a, rows 3-4 prompt_b
    tables, lens = [], []
    for row in range(7):  # rows 5, 6 share nothing
        own = take(3)
        if row < 3:
            blocks = query_prefix + prompt_a + own
        elif row < 5:
            blocks = query_prefix + prompt_b + own
        else:
            blocks = own + take(2)
        tables.append(blocks)
        shared = len(blocks) - 3 if row < 5 else 0
        lens.append(shared * bs + 1 + int(torch.randint(0, 3 * bs - 1, (1,), generator=gen)))
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    levels = [PrefixLevel(torch.tensor([query_prefix], dtype=torch.int32), torch.tensor([3 * bs], dtype=torch.int32),
                          torch.tensor([0, 0, 0, 0, 0, -1, -1], dtype=torch.int32))]
    if two_levels:
        levels.append(PrefixLevel(torch.tensor([prompt_a, prompt_b + [0]], dtype=torch.int32),
                                  torch.tensor([2 * bs, bs], dtype=torch.int32),
                                  torch.tensor([0, 0, 0, 1, 1, -1, -1], dtype=torch.int32)))
    else:  # one level only: rows 0-4 share the query prefix, then their own blocks
        pass
    q = torch.randn(7, hkv * g, d, generator=gen)
    meta = AttentionMetadata(positions=torch.tensor(lens) - 1, slot_mapping=torch.zeros(7, dtype=torch.int64),
                             query_start_loc=torch.arange(8, dtype=torch.int32),
                             seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=bt,
                             query_lens_host=[1] * 7, seq_lens_host=lens)
    return q, cache, meta, levels


@pytest.mark.parametrize("hkv,g", [(2, 1), (1, 3), (2, 4)])
@pytest.mark.parametrize("two_levels", [False, True])
def test_cascade_decode_equals_plain_decode(hkv: int, g: int, two_levels: bool) -> None:
    gen = torch.Generator().manual_seed(hkv * 10 + g + 100 * two_levels)
    q, cache, meta, levels = _batch(gen, hkv, g, two_levels)
    backend = TorchAttention()
    plain = backend._decode(0, q, cache, meta, 0.3)
    meta.prefix_levels = levels
    cascade = backend._cascade_decode(0, q, cache, meta, 0.3)
    torch.testing.assert_close(cascade, plain, atol=1e-5, rtol=1e-5)  # fp32, different summation order


def test_merge_by_lse_is_softmax_over_the_union() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 4, generator=gen), torch.randn(1, 1, 9, 4, generator=gen), torch.randn(1, 1, 9, 4, generator=gen)
    ones = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    full, _ = attend_with_lse(q, k, v, ones, 0.5)
    first = attend_with_lse(q, k[..., :4, :], v[..., :4, :], ones[..., :4], 0.5)
    rest = attend_with_lse(q, k[..., 4:, :], v[..., 4:, :], ones[..., 4:], 0.5)
    empty = attend_with_lse(q, k, v, torch.zeros_like(ones), 0.5)  # a part with nothing in it weighs 0
    torch.testing.assert_close(merge_by_lse([first, rest, empty]), full, atol=1e-6, rtol=1e-6)
