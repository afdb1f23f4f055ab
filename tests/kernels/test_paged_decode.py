import pytest
import torch

from rrm_kernels.paged_decode import paged_decode_attention, paged_decode_attention_ref
from paged_data import make_cache, scattered_tables

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}

# (kv heads, q heads per kv head, head_dim, page size)
SHAPES = [(2, 1, 16, 16), (1, 4, 32, 8), (1, 7, 64, 16), (2, 7, 128, 32), (1, 2, 16, 128)]
# ragged: a context of 1, exactly one page, one past a page boundary, several pages
LENS = [1, 16, 17, 5, 70]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hkv,g,d,page", SHAPES)
def test_decode_matches_reference(dtype, hkv, g, d, page):
    gen = torch.Generator().manual_seed(hkv * 1000 + g * 100 + d + page)
    bt, nb = scattered_tables(LENS, page, gen)
    kc, vc = make_cache(nb, page, hkv, d, dtype, gen)
    q = torch.randn(len(LENS), hkv * g, d, generator=gen).to(dtype)
    seq_lens = torch.tensor(LENS, dtype=torch.int32)
    ref = paged_decode_attention_ref(q, kc, vc, bt, seq_lens, d ** -0.5)
    for splits in (None, 1, 3):
        out = paged_decode_attention(q, kc, vc, bt, seq_lens, d ** -0.5, num_splits=splits)
        torch.testing.assert_close(out, ref, **TOL[dtype], msg=f"num_splits={splits}")


def test_split_k_with_empty_splits_and_host_bound():
    # 7 splits over a bound of 80 tokens: most sequences leave some splits empty (lse = -inf)
    gen = torch.Generator().manual_seed(1)
    lens = [80, 1, 33]
    bt, nb = scattered_tables(lens, 16, gen, extra_cols=4)
    kc, vc = make_cache(nb, 16, 2, 16, torch.float32, gen)
    q = torch.randn(3, 4, 16, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q, kc, vc, bt, seq_lens, 0.25)
    for splits in (2, 7):
        out = paged_decode_attention(q, kc, vc, bt, seq_lens, 0.25, num_splits=splits, max_seq_len=80)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_rejects_bad_input():
    kc = torch.zeros(4, 16, 2, 16)
    q = torch.zeros(2, 4, 16)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, kc, kc, bt.long(), lens, 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(q, kc, kc, bt, lens[:1], 1.0)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(torch.zeros(2, 3, 16), kc, kc, bt, lens, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q.half(), kc, kc, bt, lens, 1.0)
    with pytest.raises(ValueError, match="seq_lens must lie"):
        paged_decode_attention(q, kc, kc, bt, torch.tensor([1, 33], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="seq_lens must lie"):
        paged_decode_attention(q, kc, kc, bt, torch.tensor([0, 3], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(q, torch.zeros(4, 12, 2, 16), torch.zeros(4, 12, 2, 16), bt, lens, 1.0)
