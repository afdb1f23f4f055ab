"""The C++ CPU decode ops (csrc/cpu_decode_ops.cpp via kernels.cpu_ops) against their torch
references, on fresh random inputs, for every instruction-set path this CPU runs (AVX-512, AVX2,
scalar: each forced by isa=) and for fp32 / bf16 / fp16.

The ops must build wherever a C++ compiler is present (CI): a build failure fails these tests;
only a machine with no compiler skips them."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from paged_data import make_cache, scattered_tables
from test_shared_prefix import two_level_batch

from kernels import cpu_ops
from kernels.paged_decode import paged_decode_attention_ref
from kernels.rmsnorm import rms_norm_ref
from kernels.rope_store import rope_and_store_ref
from kernels.shared_prefix_decode import shared_prefix_decode_attention_ref

if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler: the CPU ops cannot be built here", allow_module_level=True)

ISA_NAMES = ["avx512", "avx2", "scalar"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32: the kernels' exp2 polynomial and summation order (~1e-7 relative); bf16/fp16: one rounding
# of the output in the storage type (2^-8 / 2^-11 relative) on top
ATTN_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
            torch.float16: dict(atol=3e-3, rtol=3e-3)}


@pytest.fixture(scope="module")
def isas() -> list[str]:
    return cpu_ops.supported_isas()  # builds the extension: a build error fails here


@pytest.fixture(params=ISA_NAMES)
def isa(request, isas) -> str:
    if request.param not in isas:
        pytest.skip(f"this CPU has no {request.param} (it runs {isas})")
    return request.param


def test_isa_env_and_argument(isas, monkeypatch):
    assert isas[-1] == "scalar" and isas[0] == cpu_ops.resolved_isa()
    monkeypatch.setenv(cpu_ops.ISA_ENV, "scalar")
    assert cpu_ops.resolved_isa() == "scalar"
    monkeypatch.setenv(cpu_ops.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_ops.resolved_isa()
    monkeypatch.delenv(cpu_ops.ISA_ENV)
    # a head_dim the vector width does not divide runs on a narrower path
    assert cpu_ops.resolved_isa(head_dim=20) == "scalar"
    if "avx512" in isas:
        assert cpu_ops.resolved_isa(head_dim=24) == "avx2"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv,g,d,page", [(2, 1, 16, 8), (1, 4, 32, 16), (3, 3, 64, 16), (1, 7, 64, 16), (2, 2, 40, 8),
                                          (1, 2, 20, 4)])
def test_paged_decode_with_levels_matches_reference(isa, dtype, hkv, g, d, page):
    gen = torch.Generator().manual_seed(hkv * 1000 + g * 100 + d + page)
    bt, seq_lens, level0, level1, nb = two_level_batch(page, votes=3, gen=gen)
    kc, vc = make_cache(nb, page, hkv, d, dtype, gen)
    q = torch.randn(bt.shape[0], hkv * g, d, generator=gen).to(dtype)
    scale = d ** -0.5
    plain_ref = paged_decode_attention_ref(q, kc, vc, bt, seq_lens, scale)
    plain = cpu_ops.paged_decode_attention(q, kc, vc, bt, seq_lens, scale, isa=isa)
    torch.testing.assert_close(plain, plain_ref, **ATTN_TOL[dtype])
    for levels in ([level0], [level0, level1]):
        ref = shared_prefix_decode_attention_ref(q, kc, vc, bt, seq_lens, levels, scale)
        for split in (cpu_ops.SPLIT_TOKENS, page):  # one chunk per pass, and many (more parts to merge)
            out = cpu_ops.paged_decode_attention(q, kc, vc, bt, seq_lens, scale, levels, split_tokens=split, isa=isa)
            torch.testing.assert_close(out, ref, **ATTN_TOL[dtype])


def test_many_rows_per_group_several_threads_and_strided_q(isa):
    # 16 votes x 7 heads = 112 rows: several row blocks per prefix pass; enough work for threads
    gen = torch.Generator().manual_seed(7)
    page, hkv, g, d = 16, 2, 7, 64
    bt, seq_lens, level0, level1, nb = two_level_batch(page, votes=16, gen=gen)
    kc, vc = make_cache(nb, page, hkv, d, torch.float32, gen)
    # q as the view the fused qkv projection gives: rows strided past the k and v columns
    qkv = torch.randn(bt.shape[0], (hkv * g + 2 * hkv) * d, generator=gen)
    q = qkv[:, :hkv * g * d].view(-1, hkv * g, d)
    levels = [level0, level1]
    ref = shared_prefix_decode_attention_ref(q.contiguous(), kc, vc, bt, seq_lens, levels, d ** -0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = cpu_ops.paged_decode_attention(q, kc, vc, bt, seq_lens, d ** -0.5, levels, split_tokens=16, isa=isa)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, ref, **ATTN_TOL[torch.float32])


def test_plain_decode_scattered_long_contexts(isa):
    gen = torch.Generator().manual_seed(3)
    page, hkv, g, d = 16, 3, 3, 64
    lens = [1, 17, 300, 600, 64]
    bt, nb = scattered_tables(lens, page, gen)
    kc, vc = make_cache(nb, page, hkv, d, torch.float32, gen)
    q = torch.randn(len(lens), hkv * g, d, generator=gen) * 4  # peaky softmax
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = cpu_ops.paged_decode_attention(q, kc, vc, bt, seq_lens, d ** -0.5, isa=isa)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, seq_lens, d ** -0.5),
                               **ATTN_TOL[torch.float32])


def test_paged_decode_rejects_bad_inputs():
    q = torch.randn(2, 4, 16)
    kc = torch.randn(4, 8, 2, 16)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block_tables must be an int32"):
        cpu_ops.paged_decode_attention(q, kc, kc, bt.long(), lens, 0.25)
    with pytest.raises(RuntimeError, match="share one dtype"):
        cpu_ops.paged_decode_attention(q.double(), kc, kc, bt, lens, 0.25)
    with pytest.raises(RuntimeError, match="head_dim or heads"):
        cpu_ops.paged_decode_attention(torch.randn(2, 3, 16), kc, kc, bt, lens, 0.25)


ROPE_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
            torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 32), (7, 1, 128), (2, 1, 20)])
def test_rope_and_store_matches_reference(isa, dtype, hq, hkv, d):
    gen = torch.Generator().manual_seed(hq * 100 + d)
    t, page, blocks, max_pos = 6, 8, 5, 100
    # q, k, v as views into one fused projection output, as the decoder hands them over
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    pos = torch.randint(0, max_pos, (t,), generator=gen)
    freqs = torch.arange(max_pos)[:, None] * (1e4 ** (-torch.arange(0, d, 2) / d))[None]
    cos, sin = torch.cat((freqs, freqs), -1).cos().to(dtype), torch.cat((freqs, freqs), -1).sin().to(dtype)
    slots = torch.randperm(blocks * page, generator=gen)[:t]
    slots[2] = -1  # padding row: rotated, not stored
    caches = [make_cache(blocks, page, hkv, d, dtype, gen) for _ in range(2)]
    kc_ref, vc_ref = (c.clone() for c in caches[0])
    q_ref, _ = rope_and_store_ref(q, k, v, pos, cos, sin, kc_ref, vc_ref, slots)
    kc, vc = (c.clone() for c in caches[0])
    q_out = cpu_ops.rope_and_store(q, k, v, pos, cos, sin, kc, vc, slots, isa=isa)
    torch.testing.assert_close(q_out, q_ref, **ROPE_TOL[dtype])
    torch.testing.assert_close(kc, kc_ref, **ROPE_TOL[dtype])
    assert torch.equal(vc, vc_ref)  # v is copied as it is


def test_rope_and_store_rejects_out_of_range_indices():
    q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
    cos = sin = torch.ones(10, 8)
    kc = torch.zeros(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        cpu_ops.rope_and_store(q, k, k, torch.tensor([0, 10]), cos, sin, kc, kc.clone(), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_ops.rope_and_store(q, k, k, torch.tensor([0, 1]), cos, sin, kc, kc.clone(), torch.tensor([0, 8]))


NORM_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
            torch.float16: dict(atol=4e-3, rtol=4e-3)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,h", [(1, 576), (7, 96), (300, 200), (3, 17)])
def test_rms_norm_with_and_without_residual(isa, dtype, rows, h):
    gen = torch.Generator().manual_seed(rows + h)
    x = (torch.randn(rows, h, generator=gen) * 3).to(dtype)
    r = torch.randn(rows, h, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(h, generator=gen)).to(dtype)
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5, isa=isa), rms_norm_ref(x, w, 1e-5), **NORM_TOL[dtype])
    out, res = cpu_ops.rms_norm(x, w, 1e-5, r, isa=isa)
    out_ref, res_ref = rms_norm_ref(x, w, 1e-5, r)
    assert torch.equal(res, res_ref)  # the residual stream: the same single rounding as torch's add
    torch.testing.assert_close(out, out_ref, **NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 2 * 1536), (3, 5, 2 * 40), (1, 2 * 7)])
def test_silu_mul(isa, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=gen) * 4).to(dtype)
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
           torch.float16: dict(atol=3e-3, rtol=3e-3)}[dtype]
    torch.testing.assert_close(cpu_ops.silu_mul(x, isa=isa), cpu_ops.silu_mul_ref(x), **tol)
    # a strided input (the rows of a wider buffer) gives the same result
    wide = torch.randn(shape[-2] if len(shape) > 1 else 1, shape[-1] + 6, generator=gen).to(dtype)
    view = wide[:, 3:3 + shape[-1]]
    torch.testing.assert_close(cpu_ops.silu_mul(view, isa=isa), F.silu(view.chunk(2, -1)[0]) * view.chunk(2, -1)[1],
                               **tol)


LINEAR_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
              torch.float16: dict(atol=4e-3, rtol=4e-3)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,bias", [(1, 64, 8, False), (3, 577, 33, True), (8, 576, 960, True),
                                        (13, 40, 7, False), (32, 96, 100, True), (70, 17, 5, False)])
def test_linear_matches_torch(isa, dtype, m, k, n, bias):
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k + 3, generator=gen).to(dtype)[:, 2:2 + k]  # rows strided in a wider buffer
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    # reference in fp32 from the same stored values, rounded once to dtype (what a BLAS does)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    torch.testing.assert_close(cpu_ops.linear(x, w, b, isa=isa), ref, **LINEAR_TOL[dtype])


def test_linear_keeps_leading_dims_and_rejects_mismatches():
    x = torch.randn(2, 3, 16)
    w = torch.randn(5, 16)
    assert cpu_ops.linear(x, w).shape == (2, 3, 5)
    with pytest.raises(RuntimeError, match="in_features"):
        cpu_ops.linear(torch.randn(2, 15), w)
    with pytest.raises(RuntimeError, match="share one dtype"):
        cpu_ops.linear(x.double(), w)
