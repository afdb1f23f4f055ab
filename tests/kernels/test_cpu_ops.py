"""The C++ CPU decode ops (rrm_kernels/csrc/cpu_decode_ops.cpp via rrm_kernels.cpu_ops) against their torch
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

from rrm_kernels import cpu_ops
from rrm_kernels.paged_decode import paged_decode_attention_ref
from rrm_kernels.rmsnorm import rms_norm_ref
from rrm_kernels.rope_store import rope_and_store_ref
from rrm_kernels.shared_prefix_decode import shared_prefix_decode_attention_ref
from rrm_engine.layers.attention import PrefixLevel

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
    with pytest.raises(ValueError, match="RRM_CPU_ISA must be one of auto"):
        cpu_ops.resolved_isa()
    with pytest.raises(ValueError, match="isa must be one of auto"):  # the argument, named as such
        cpu_ops.resolved_isa("sse9")
    monkeypatch.setenv(cpu_ops.ISA_ENV, " Auto ")  # as quant_linear_cpu has always read it: the best
    assert cpu_ops.resolved_isa() == isas[0]
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


def votes_sharing_a_prompt(votes: int, prompt_blocks: int, page: int, gen: torch.Generator):
    """`votes` sequences whose tables start with the same prompt blocks, then 1..2 pages of their own
    (blocks at random places); returns (block_tables, seq_lens, the one-group level, blocks used)."""
    perm = torch.randperm(prompt_blocks + 2 * votes + 1, generator=gen) + 1
    prompt = perm[:prompt_blocks].tolist()
    tables, lens = [], []
    for i in range(votes):
        own = perm[prompt_blocks + 2 * i: prompt_blocks + 2 * i + 2].tolist()
        tables.append(prompt + own)
        lens.append(prompt_blocks * page + int(torch.randint(1, 2 * page + 1, (1,), generator=gen)))
    level = PrefixLevel(torch.tensor([prompt], dtype=torch.int32), torch.tensor([prompt_blocks * page], dtype=torch.int32),
                        torch.zeros(votes, dtype=torch.int32))
    return (torch.tensor(tables, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), level,
            prompt_blocks + 2 * votes + 2)


@pytest.mark.parametrize("votes,g", [(8, 3), (16, 7)])
def test_long_shared_prompt_on_several_threads_with_strided_q(isa, votes, g):
    # enough work for the op to use threads; 16 votes x 7 heads = 112 rows: several row blocks
    gen = torch.Generator().manual_seed(votes)
    page, hkv, d = 16, 2, 64
    bt, seq_lens, level, nb = votes_sharing_a_prompt(votes, 40, page, gen)
    kc, vc = make_cache(nb, page, hkv, d, torch.float32, gen)
    # q as the view the fused qkv projection gives: rows strided past the k and v columns
    qkv = torch.randn(votes, (hkv * g + 2 * hkv) * d, generator=gen)
    q = qkv[:, :hkv * g * d].view(-1, hkv * g, d)
    ref = paged_decode_attention_ref(q.contiguous(), kc, vc, bt, seq_lens, d ** -0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = cpu_ops.paged_decode_attention(q, kc, vc, bt, seq_lens, d ** -0.5, [level], isa=isa)
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


def test_paged_decode_rejects_out_of_range_indices():
    """Every index the kernel will follow is checked before it runs (TORCH_CHECK: a RuntimeError,
    not a crash or a write past an array); entries it never reads may hold anything."""
    gen = torch.Generator().manual_seed(11)
    page, hkv, g, d = 8, 2, 2, 16
    bt, seq_lens, level0, level1, nb = two_level_batch(page, votes=3, gen=gen)
    kc, vc = make_cache(nb, page, hkv, d, torch.float32, gen)
    q = torch.randn(bt.shape[0], hkv * g, d, generator=gen)
    levels = [tuple(cpu_ops.level_fields(lv)) for lv in (level0, level1)]

    def run(bt=bt, seq_lens=seq_lens, levels=levels):
        return cpu_ops.paged_decode_attention(q, kc, vc, bt, seq_lens, d ** -0.5, levels)

    def changed(t: torch.Tensor, index, value) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t

    def level_changed(i: int, field: int, index, value) -> list:
        out = [list(lv) for lv in levels]
        out[i][field] = changed(out[i][field], index, value)
        return [tuple(lv) for lv in out]

    width = bt.shape[1]
    last = int(seq_lens[0]) // page  # the last table entry row 0 reads (its length is not a whole page)
    bad = [
        (dict(bt=changed(bt, (0, last), nb)), f"block id {nb} at entry {last} is outside the cache's {nb} blocks"),
        (dict(bt=changed(bt, (1, 0), -1)), "block id -1"),
        (dict(seq_lens=changed(seq_lens, 2, width * page + 1)), f"length {width * page + 1} is outside"),
        (dict(seq_lens=changed(seq_lens, 0, -1)), "length -1 is outside"),
        (dict(levels=level_changed(1, 2, 0, 2)), r"level 1: seq_group\[0\] = 2 is outside \[-1, 2\)"),
        (dict(levels=level_changed(0, 2, 4, -2)), r"level 0: seq_group\[4\] = -2"),
        (dict(levels=level_changed(0, 1, 0, 3 * page)), "level block_tables/lens row 0: length"),
        (dict(levels=level_changed(1, 0, (1, 1), nb + 5)), f"block id {nb + 5}"),
    ]
    for kwargs, match in bad:
        with pytest.raises(RuntimeError, match=match):
            run(**kwargs)
    # entries past a row's length are never read: padding may hold any value
    padded = bt.clone()
    for r in range(bt.shape[0]):
        padded[r, -(-int(seq_lens[r]) // page):] = 10 ** 6
    padded_level = level_changed(1, 0, (0, 1), -7)  # level 1 group 0 is one page long: entry 1 unused
    ref = shared_prefix_decode_attention_ref(q, kc, vc, bt, seq_lens, [level0, level1], d ** -0.5)
    torch.testing.assert_close(run(bt=padded, levels=padded_level), ref, **ATTN_TOL[torch.float32])


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


@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])
def test_sampler_equals_reference_token_for_token(isa, spread):
    from rrm_kernels.sampling import sample_ref
    gen = torch.Generator().manual_seed(int(spread * 10))
    r, v, b = 6, 1000, 1000
    logits = torch.randn(r, v, generator=gen) * spread
    logits[1, ::7] = float("-inf")  # masked vocabulary entries are never drawn
    logits[2] = (logits[2] * 2).round() / 2  # many exact ties
    row_index = torch.randint(0, r, (b,), generator=gen)
    temperature = torch.tensor([0.0, 0.6, 1.0, 2.0])[torch.randint(0, 4, (b,), generator=gen)]
    seeds = torch.randint(0, 2 ** 62, (b,), generator=gen)
    offsets = torch.randint(0, 2 ** 40, (b,), generator=gen)
    off = dict(top_k=torch.zeros(b, dtype=torch.int32), top_p=torch.ones(b), min_p=torch.zeros(b))
    ref_tok, ref_lp = sample_ref(logits, row_index, temperature, off["top_k"], off["top_p"], off["min_p"], seeds, offsets)
    tok, lp = cpu_ops.sample_unfiltered(logits, row_index, temperature, seeds, offsets, isa=isa)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lp).all() and (lp <= 0).all()


def test_sampler_rejects_bad_rows_and_parameters():
    logits = torch.randn(3, 50)
    logits[1, 4] = float("nan")
    logits[2] = float("-inf")
    args = lambda rows: (torch.tensor(rows), torch.full((len(rows),), 0.7), torch.zeros(len(rows), dtype=torch.int64),
                         torch.zeros(len(rows), dtype=torch.int64))
    with pytest.raises(ValueError, match=r"rows \[1, 2\]"):
        cpu_ops.sample_unfiltered(logits, *args([0, 1, 2, 1]))
    tok, _ = cpu_ops.sample_unfiltered(logits, *args([0, 0]))  # the bad rows are not sampled: fine
    assert tok.shape == (2,)
    with pytest.raises(RuntimeError, match="row_index"):
        cpu_ops.sample_unfiltered(logits, *args([3]))
    rows, _, seeds, offs = args([0])
    with pytest.raises(ValueError, match="temperature must be finite"):
        cpu_ops.sample_unfiltered(logits, rows, torch.tensor([-1.0]), seeds, offs)


def test_sampler_flags_a_bad_temperature_for_its_sample_alone():
    """A temperature that is not finite and >= 0 is one sample's problem: with return_status it
    comes back flagged (status 2) and every other sample draws exactly what it draws alone."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 300, generator=gen) * 3
    rows = torch.tensor([0, 1, 2, 1])
    seeds = torch.tensor([5, 6, 7, 8])
    offs = torch.tensor([0, 3, 1, 2])
    temps = torch.tensor([0.8, 0.0, 1.3, 0.6])
    want_tok, want_lp = cpu_ops.sample_unfiltered(logits, rows, temps, seeds, offs)
    for bad in (float("inf"), float("nan"), -0.5, float("-inf")):
        t = temps.clone()
        t[2] = bad
        tok, lp, status = cpu_ops.sample_unfiltered(logits, rows, t, seeds, offs, return_status=True)
        assert status.tolist() == [0, 0, 2, 0]
        keep = [0, 1, 3]
        assert torch.equal(tok[keep], want_tok[keep]) and torch.equal(lp[keep], want_lp[keep])


def test_every_op_parallel_from_the_least_work_changes_no_bit(isa):
    # With spinning OpenMP threads rrm_engine lowers the work from which the ops go parallel
    # (rrm_engine.threads.SPINNING_MIN); at a minimum of 1 every op splits across 2 threads. Each
    # output element is still computed by one thread in one order, so nothing may change.
    gen = torch.Generator().manual_seed(5)
    page, hkv, g, d = 8, 2, 3, 32
    bt, seq_lens, level0, level1, nb = two_level_batch(page, votes=3, gen=gen)
    kc, vc = make_cache(nb, page, hkv, d, torch.float32, gen)
    b = bt.shape[0]
    qkv = torch.randn(b, (hkv * g + 2 * hkv) * d, generator=gen)
    q, k, v = (x.view(b, -1, d) for x in qkv.split([hkv * g * d, hkv * d, hkv * d], dim=-1))
    freqs = torch.arange(64)[:, None] * (1e4 ** (-torch.arange(0, d, 2) / d))[None]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    pos = torch.randint(0, 64, (b,), generator=gen)
    slots = torch.randperm(nb * page, generator=gen)[:b]
    x, r = torch.randn(b, 96, generator=gen), torch.randn(b, 96, generator=gen)
    w_norm, w_lin = 1 + 0.1 * torch.randn(96, generator=gen), torch.randn(70, 96, generator=gen)
    gate_up = torch.randn(b, 2 * 48, generator=gen)
    logits = torch.randn(b, 300, generator=gen) * 3
    rows = torch.arange(b)
    temp, seeds, offs = torch.full((b,), 0.7), torch.arange(b) + 11, torch.arange(b) * 3

    def run_all():
        kcc, vcc = kc.clone(), vc.clone()
        qr = cpu_ops.rope_and_store(q, k, v, pos, cos, sin, kcc, vcc, slots, isa=isa)
        return [qr, kcc, vcc, cpu_ops.paged_decode_attention(qr, kcc, vcc, bt, seq_lens, d ** -0.5, [level0, level1],
                                                             split_tokens=page, isa=isa),
                *cpu_ops.rms_norm(x, w_norm, 1e-5, r, isa=isa), cpu_ops.silu_mul(gate_up, isa=isa),
                cpu_ops.linear(x, w_lin, isa=isa), *cpu_ops.sample_unfiltered(logits, rows, temp, seeds, offs, isa=isa)]

    threads = torch.get_num_threads()
    old = cpu_ops.set_parallel_min(1, 1, 1)
    try:
        cpu_ops.set_parallel_min(*old)
        torch.set_num_threads(1)
        one = run_all()
        torch.set_num_threads(2)
        assert cpu_ops.set_parallel_min(1, 1, 1) == old
        two = run_all()
    finally:
        cpu_ops.set_parallel_min(*old)
        torch.set_num_threads(threads)
    for a, c in zip(one, two):
        assert torch.equal(a, c)
    with pytest.raises(ValueError, match="must be >= 1"):
        cpu_ops.set_parallel_min(0, 1, 1)
