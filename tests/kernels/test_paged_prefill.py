import pytest
import torch

from rrm_kernels.paged_prefill import paged_prefill_attention, paged_prefill_attention_ref
from paged_data import make_cache, scattered_tables

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}
# (kv heads, q heads per kv head, head_dim, page size)
SHAPES = [(2, 1, 16, 16), (1, 4, 32, 8), (1, 7, 64, 16), (2, 7, 128, 32)]
# (context incl. new tokens, new tokens): a context of 1, a whole prompt across a page boundary,
# an extend after a cached prefix, one token after exactly one page, a long ragged extend, a short
# extend after a cached prefix longer than one 64-key tile (which then runs unmasked)
CASES = [(1, 1), (17, 17), (40, 5), (17, 1), (70, 66), (100, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hkv,g,d,page", SHAPES)
def test_prefill_matches_reference(dtype, hkv, g, d, page):
    gen = torch.Generator().manual_seed(hkv * 1000 + g * 100 + d + page)
    lens = [n for n, _ in CASES]
    qlens = [q for _, q in CASES]
    bt, nb = scattered_tables(lens, page, gen)
    kc, vc = make_cache(nb, page, hkv, d, dtype, gen)
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(qlens), hkv * g, d, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = paged_prefill_attention(q, kc, vc, bt, qsl, seq_lens, d ** -0.5, max(qlens))
    ref = paged_prefill_attention_ref(q, kc, vc, bt, qsl, seq_lens, d ** -0.5, max(qlens))
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_prefill_matches_sdpa_on_a_dense_prompt():
    # an independent check of the causal mask: one whole prompt vs torch SDPA
    gen = torch.Generator().manual_seed(3)
    n, hkv, g, d, page = 37, 2, 2, 16, 8
    bt, nb = scattered_tables([n], page, gen)
    kc, vc = make_cache(nb, page, hkv, d, torch.float32, gen)
    q = torch.randn(n, hkv * g, d, generator=gen)
    out = paged_prefill_attention(q, kc, vc, bt, torch.tensor([0, n], dtype=torch.int32),
                                  torch.tensor([n], dtype=torch.int32), 0.25, n)
    idx = torch.arange(n)
    k = kc[bt[0].long()[idx // page], idx % page]
    v = vc[bt[0].long()[idx // page], idx % page]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_prefill_rejects_bad_input():
    kc = torch.zeros(4, 16, 2, 16)
    q = torch.zeros(3, 4, 16)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.tensor([2, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill_attention(q, kc, kc, bt, torch.tensor([0, 2, 3]), lens, 1.0, 2)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill_attention(q, kc, kc, bt, torch.tensor([0, 3], dtype=torch.int32), lens, 1.0, 2)
    with pytest.raises(ValueError, match="rise from 0"):
        paged_prefill_attention(q, kc, kc, bt, torch.tensor([0, 2, 4], dtype=torch.int32), lens, 1.0, 2)
    with pytest.raises(ValueError, match="must be <= seq_lens"):
        paged_prefill_attention(q, kc, kc, bt, torch.tensor([0, 1, 3], dtype=torch.int32), lens, 1.0, 2)
    with pytest.raises(ValueError, match="max_query_len"):
        paged_prefill_attention(q, kc, kc, bt, torch.tensor([0, 2, 3], dtype=torch.int32), lens, 1.0, 0)
    with pytest.raises(ValueError, match="head_dim"):
        paged_prefill_attention(torch.zeros(3, 4, 8), kc, kc, bt, torch.tensor([0, 2, 3], dtype=torch.int32),
                                lens, 1.0, 2)
