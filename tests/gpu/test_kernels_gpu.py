"""The kernels and the engine on a real GPU: bf16 (which Triton's interpreter gets wrong, so the
CPU suite in tests/kernels cannot check it), the RRM-7B shapes of DESIGN.md's targets, the
CUDA-graph decode path. Skipped without CUDA.

A dry run of this file's own code on the CPU, through the interpreter at small shapes and without
bf16: RRM_GPU_TEST_DEVICE=cpu python -m pytest -q tests/gpu
"""
from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("RRM_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a GPU (RRM_GPU_TEST_DEVICE=cpu: interpreter dry run)")
GPU = DEVICE == "cuda"

# inputs ~N(0, 1); bf16 keeps 8 bits of mantissa, and the kernels round p to the input dtype for PV
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if GPU else [torch.float16, torch.float32]
# (kv heads, q heads per kv head, head_dim): RRM-7B, SmolLM2-135M
SHAPES = [(4, 7, 128), (3, 3, 64)] if GPU else [(1, 7, 32), (2, 3, 16)]
PAGE = 16
# ragged contexts: 1 token, one page, one past it, and long ones (split-K, many tiles)
LENS = [1, 16, 17, 1000, 4096, 333] if GPU else [1, 16, 17, 70]


def paged(lens: list[int], hkv: int, d: int, dtype: torch.dtype, gen: torch.Generator, shared: list[int] | None = None):
    """Caches and block tables with scattered blocks; `shared` blocks (if any) head every table."""
    shared = shared or []
    own = [-(-n // PAGE) - len(shared) for n in lens]
    first = len(shared)
    perm = (torch.randperm(sum(own), generator=gen) + first).tolist()
    width = max(own) + len(shared) + 1
    rows, i = [], 0
    for n in own:
        rows.append(shared + perm[i:i + n] + [0] * (width - len(shared) - n))
        i += n
    nb = first + sum(own)
    kc = torch.randn(nb, PAGE, hkv, d, generator=gen).to(dtype).to(DEVICE)
    vc = torch.randn(nb, PAGE, hkv, d, generator=gen).to(dtype).to(DEVICE)
    return kc, vc, torch.tensor(rows, dtype=torch.int32, device=DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hkv,g,d", SHAPES)
def test_decode_and_shared_prefix(dtype, hkv, g, d):
    from kernels.paged_decode import paged_decode_attention, paged_decode_attention_ref
    from kernels.shared_prefix_decode import shared_prefix_decode_attention
    gen = torch.Generator().manual_seed(d + g)
    kc, vc, bt, lens = paged(LENS, hkv, d, dtype, gen)
    q = torch.randn(len(LENS), hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    ref = paged_decode_attention_ref(q, kc, vc, bt, lens, d ** -0.5)
    for splits in (None, 1, 5):
        out = paged_decode_attention(q, kc, vc, bt, lens, d ** -0.5, num_splits=splits, max_seq_len=max(LENS))
        torch.testing.assert_close(out, ref, **TOL[dtype], msg=f"num_splits={splits}")
    # 8 votes sharing a prefix (4K tokens on the GPU), each with its own suffix
    prefix = (4096 if GPU else 64) // PAGE
    vote_lens = [prefix * PAGE + n for n in (1, 7, 16, 17, 40, 100, 3, 250)]
    kc, vc, bt, lens = paged(vote_lens, hkv, d, dtype, gen, shared=list(range(prefix)))
    q = torch.randn(8, hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    level = (torch.arange(prefix, dtype=torch.int32, device=DEVICE)[None], torch.tensor([prefix * PAGE], dtype=torch.int32,
             device=DEVICE), torch.zeros(8, dtype=torch.int32, device=DEVICE))
    out = shared_prefix_decode_attention(q, kc, vc, bt, lens, [level], d ** -0.5, max_seq_len=max(vote_lens))
    torch.testing.assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, lens, d ** -0.5), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hkv,g,d", SHAPES)
def test_prefill_varlen_and_long_prompt(dtype, hkv, g, d):
    from kernels.paged_prefill import paged_prefill_attention, paged_prefill_attention_ref
    gen = torch.Generator().manual_seed(d * g)
    # (context, new tokens): whole prompts, extends after cached prefixes, a long prompt
    cases = [(1, 1), (17, 17), (300, 40), (70, 1), (2048, 2048)] if GPU else [(1, 1), (17, 17), (40, 5), (70, 66)]
    lens, qlens = [c for c, _ in cases], [n for _, n in cases]
    kc, vc, bt, seq_lens = paged(lens, hkv, d, dtype, gen)
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(qlens), hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    out = paged_prefill_attention(q, kc, vc, bt, qsl, seq_lens, d ** -0.5, max(qlens))
    ref = paged_prefill_attention_ref(q, kc, vc, bt, qsl, seq_lens, d ** -0.5, max(qlens))
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rmsnorm_and_rope_store(dtype):
    from kernels.rmsnorm import rms_norm, rms_norm_ref
    from kernels.rope_store import rope_and_store, rope_and_store_ref
    from rrm_engine.rotary import rotary_cos_sin
    gen = torch.Generator().manual_seed(7)
    hidden, (hkv, g, d) = (3584 if GPU else 96), SHAPES[0]
    x, r = (torch.randn(300, hidden, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    w = torch.rand(hidden, generator=gen).add(0.5).to(dtype).to(DEVICE)
    out, res = rms_norm(x, w, 1e-6, residual=r)
    ref, ref_res = rms_norm_ref(x, w, 1e-6, residual=r)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)  # the residual sum is one rounding either way
    torch.testing.assert_close(out, ref, **TOL[dtype])
    t = 300
    q = torch.randn(t, hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    k, v = (torch.randn(t, hkv, d, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    cos, sin = rotary_cos_sin(torch.arange(4096, device=DEVICE), d, 1e6, dtype)
    positions = torch.randint(0, 4096, (t,), generator=gen).to(DEVICE)
    slots = torch.randperm(32 * PAGE, generator=gen)[:t].to(DEVICE)
    caches = [torch.zeros(32, PAGE, hkv, d, dtype=dtype, device=DEVICE) for _ in range(4)]
    got = rope_and_store(q, k, v, positions, cos, sin, caches[0], caches[1], slots)
    want = rope_and_store_ref(q, k, v, positions, cos, sin, caches[2], caches[3], slots)
    for a, b in zip(got + tuple(caches[:2]), want + tuple(caches[2:])):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32] if GPU else [torch.float32], ids=str)
def test_sampler_and_token_logprobs_at_vocab_scale(dtype):
    from kernels.sampling import filter_mask_ref, sample, sample_ref
    from kernels.selective_log_softmax import token_logprobs
    gen = torch.Generator().manual_seed(3)
    rows, vocab = (256, 152064) if GPU else (8, 4000)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype).to(DEVICE)
    full = lambda v, dt: torch.full((rows,), v, dtype=dt, device=DEVICE)  # noqa: E731
    p = dict(row_index=torch.arange(rows, device=DEVICE), temperature=full(0.6, torch.float32),
             top_k=full(50, torch.int32), top_p=full(0.95, torch.float32), min_p=full(0.0, torch.float32),
             seeds=torch.arange(rows, device=DEVICE), offsets=torch.zeros(rows, dtype=torch.int64, device=DEVICE))
    tokens, logprobs = sample(logits, **p, backend="triton")
    ref_tokens, ref_logprobs = sample_ref(logits, **p)
    keep = filter_mask_ref(logits.float() / 0.6, p["top_k"], p["top_p"], p["min_p"])
    assert bool(keep.gather(1, tokens[:, None]).all()), "a token outside the top-k / top-p set"
    # same counter-based random numbers: the kernel draws what the reference draws, but for a
    # threshold that lands between two logits equal up to the kernel's fp32 search resolution
    assert (tokens == ref_tokens).float().mean() >= 0.99
    same = tokens == ref_tokens
    torch.testing.assert_close(logprobs[same], ref_logprobs[same], atol=1e-3, rtol=1e-3)
    greedy = dict(p, temperature=full(0.0, torch.float32))
    g_tokens, _ = sample(logits, **greedy, backend="triton")
    assert torch.equal(g_tokens, logits.float().argmax(1))
    labels = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    want = torch.log_softmax(logits.float(), 1).gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(token_logprobs(logits, labels, backend="triton"), want, atol=1e-3, rtol=1e-3)
    logits[5, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN|nan|finite"):
        sample(logits, **p, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_engine_triton_backend_and_cuda_graphs(tiny_qwen2_dir, dtype):
    """The whole decoder through the Triton kernels (fused rotary/KV store, fused norms, prefix
    cascade) against the torch backend; then CUDA-graph decode against eager decode."""
    import rrm_engine as rrm
    from rrm_engine.attention import AttentionMetadata
    prompts = [list(range(100, 140)) + [200 + i] * (3 + 9 * i) for i in range(3)]  # shared head, own tails
    params = rrm.SamplingParams(n=4, temperature=0.8, max_tokens=12, seed=5, ignore_eos=True)
    make = lambda **kw: rrm.LLM(str(tiny_qwen2_dir), device=DEVICE, dtype=dtype, kv_cache_tokens=2048,  # noqa: E731
                                block_size=PAGE, **kw)
    llms = {"torch": make(attention_backend="torch"), "triton": make(attention_backend="triton")}
    # one prefill step through both backends: logits close in every dtype
    step = {}
    for name, llm in llms.items():
        dec = llm.loaded.model
        cache = llm.engine.cache
        ids = torch.tensor(prompts[2], device=DEVICE)
        n = len(prompts[2])
        meta = AttentionMetadata(positions=torch.arange(n, device=DEVICE), slot_mapping=torch.arange(n, device=DEVICE),
                                 query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=DEVICE),
                                 seq_lens=torch.tensor([n], dtype=torch.int32, device=DEVICE),
                                 block_tables=torch.arange(-(-n // PAGE), dtype=torch.int32, device=DEVICE)[None],
                                 query_lens_host=[n], seq_lens_host=[n])
        with torch.inference_mode():
            step[name] = dec.compute_logits(dec(ids, meta.positions, cache, meta)).float()
        llm.invalidate_prefix_cache()
    scale = step["torch"].abs().max()
    torch.testing.assert_close(step["triton"] / scale, step["torch"] / scale, **TOL[dtype])
    if dtype != torch.float32:
        return  # sampled tokens may part ways at a near-tie once logits differ in the last bf16 bit
    outs = {name: [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)] for name, llm in llms.items()}
    assert outs["triton"] == outs["torch"]
    graphs = make(attention_backend="triton", cuda_graphs=True)
    assert [[c.token_ids for c in o.outputs] for o in graphs.generate(prompts, params)] == outs["triton"]
