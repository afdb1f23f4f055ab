"""The kernels and the engine on a real GPU: bf16 (which Triton's interpreter gets wrong, so the
CPU suite in tests/kernels cannot check it), the RRM-7B shapes of DESIGN.md's targets, the
CUDA-graph decode path (captured at start-up, with split-K and the prefix-tree cascade read from
static plan buffers), mixed prefill+decode steps, NaN logits failing one request, the csrc greedy
sampler backend, and the selective log-softmax gradient under bf16 autocast. Skipped without CUDA.

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
    from rrm_kernels.paged_decode import paged_decode_attention, paged_decode_attention_ref
    from rrm_kernels.shared_prefix_decode import shared_prefix_decode_attention
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
    from rrm_kernels.paged_prefill import paged_prefill_attention, paged_prefill_attention_ref
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
    from rrm_kernels.rmsnorm import rms_norm, rms_norm_ref
    from rrm_kernels.rope_store import rope_and_store, rope_and_store_ref
    from rrm_engine.layers.rotary import rotary_cos_sin
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
    from rrm_kernels.sampling import filter_mask_ref, sample, sample_ref
    from rrm_kernels.selective_log_softmax import token_logprobs
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
    from rrm_engine.layers.attention import AttentionMetadata
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_tree_and_static_plan_at_7b_shapes(dtype):
    """Three levels (system prompt | query | comparison) and a static plan reused by steps of
    other shapes, against plain decode: what the engine's graphs replay."""
    from rrm_kernels.decode_plan import HostLevel, StaticDecodePlan, plan_decode
    from rrm_kernels.paged_decode import paged_decode_attention_ref
    from rrm_kernels.shared_prefix_decode import decode_attention
    gen = torch.Generator().manual_seed(11)
    hkv, g, d = SHAPES[0]
    sys_n, q_n, p_n = (512, 1024, 2048) if GPU else (16, 32, 48)  # tokens, whole pages
    queries, pairs, votes = (2, 3, 8) if GPU else (2, 2, 2)
    b = queries * pairs * votes
    sys_b = list(range(sys_n // PAGE))
    nxt = len(sys_b)
    q_b, p_b = [], []
    for _ in range(queries):
        q_b.append(list(range(nxt, nxt + q_n // PAGE)))
        nxt += q_n // PAGE
    for _ in range(queries * pairs):
        p_b.append(list(range(nxt, nxt + p_n // PAGE)))
        nxt += p_n // PAGE
    heads = [sys_b + q_b[r // (pairs * votes)] + p_b[r // votes] for r in range(b)]
    suffix = [1 + (r * 37) % (3 * PAGE) for r in range(b)]
    lens = [sys_n + q_n + p_n + n for n in suffix]
    tables = []
    for r in range(b):
        own = -(-suffix[r] // PAGE)
        tables.append(heads[r] + list(range(nxt, nxt + own)))
        nxt += own
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    kc = torch.randn(nxt + 1, PAGE, hkv, d, generator=gen).to(dtype).to(DEVICE)
    vc = torch.randn(nxt + 1, PAGE, hkv, d, generator=gen).to(dtype).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(b, hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    levels = [HostLevel([sys_b], [sys_n], [0] * b),
              HostLevel(q_b, [q_n] * queries, [r // (pairs * votes) for r in range(b)]),
              HostLevel(p_b, [p_n] * (queries * pairs), [r // votes for r in range(b)])]
    want = paged_decode_attention_ref(q, kc, vc, bt, seq_lens, d ** -0.5)
    plan = plan_decode(b, hkv * g, hkv, d, PAGE, q.device, max_seq_len=max(lens), seq_lens=lens, levels=levels)
    torch.testing.assert_close(decode_attention(q, kc, vc, bt, seq_lens, d ** -0.5, plan), want, **TOL[dtype])
    # the same batch through a static plan of 2x its rows, after a step with other levels
    p = 2 * b
    static = StaticDecodePlan(p, hkv * g, hkv, d, PAGE, max_seq_len=8 * max(lens), device=q.device)
    view = static.view(p)
    scratch = nxt
    bt_p = torch.full((p, 8 * max(lens) // PAGE), scratch, dtype=torch.int32, device=DEVICE)
    bt_p[:b, :width] = bt
    lens_p = torch.cat([seq_lens, torch.ones(p - b, dtype=torch.int32, device=DEVICE)])
    q_p = torch.cat([q, q])
    static.fill(p, lens, levels[:1])
    decode_attention(q_p, kc, vc, bt_p, lens_p, d ** -0.5, view)
    static.fill(p, lens, levels)
    out = decode_attention(q_p, kc, vc, bt_p, lens_p, d ** -0.5, view)
    torch.testing.assert_close(out[:b], want, **TOL[dtype])


def rrm_like_prompts(queries: int, pairs: int) -> list[list[int]]:
    """A 2-page 'system prompt' every prompt shares, a 3-page query per query, a pair per prompt."""
    system = list(range(300, 300 + 2 * PAGE))
    out = []
    for qi in range(queries):
        query = [1000 + 50 * qi + j % 50 for j in range(3 * PAGE)]
        out += [system + query + [2000 + 97 * (qi * pairs + c) + j % 97 for j in range(PAGE + 5)] for c in range(pairs)]
    return out


def test_engine_graphs_keep_cascade_and_split_k_and_mixed_steps(tiny_qwen2_dir):
    """fp32 engine, Triton backend: graphs captured at start-up on CUDA; prompts with two queries
    in flight (three prefix levels) decode through the graphs with the same samples as the eager
    Triton engine and the torch engine; a small token budget makes chunked prefills share steps
    with decodes (mixed steps), with the same samples again."""
    import rrm_engine as rrm
    import rrm_engine.layers.attention.triton_backend as tb
    prompts = rrm_like_prompts(queries=2, pairs=2)
    params = rrm.SamplingParams(n=3, temperature=0.8, max_tokens=10, seed=7, ignore_eos=True)
    make = lambda **kw: rrm.LLM(str(tiny_qwen2_dir), device=DEVICE, dtype=torch.float32, kv_cache_tokens=4096,  # noqa: E731
                                block_size=PAGE, **kw)
    run = lambda llm: [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]  # noqa: E731
    want = run(make(attention_backend="torch"))
    assert run(make(attention_backend="triton")) == want
    plans = []
    real = tb.decode_attention
    tb.decode_attention = lambda q, *a, **kw: plans.append(a[-1]) or real(q, *a, **kw)
    try:
        graphs = make(attention_backend="triton", cuda_graphs=True)
        static = graphs.engine.runner.static_decode
        if GPU:
            assert sorted(static.graphs) == static.sizes  # every size captured at start-up
        assert run(graphs) == want
    finally:
        tb.decode_attention = real
    assert any(pl.has_levels for pl in plans)  # the cascade ran on the static path
    mixed_calls = []
    tb_prefill = tb.paged_prefill_attention
    tb.decode_attention = lambda q, *a, **kw: mixed_calls.append(("decode", q.shape[0])) or real(q, *a, **kw)
    tb.paged_prefill_attention = lambda q, *a, **kw: mixed_calls.append(("prefill", q.shape[0])) or tb_prefill(q, *a, **kw)
    try:
        # 24-token budget: the later prompts prefill in chunks while the first ones decode
        chunked = make(attention_backend="triton", max_num_batched_tokens=24)
        assert run(chunked) == want
    finally:
        tb.decode_attention, tb.paged_prefill_attention = real, tb_prefill
    pairs = list(zip(mixed_calls, mixed_calls[1:]))
    assert any(a[0] == "decode" and b[0] == "prefill" for a, b in pairs), "no mixed step happened"


@pytest.mark.parametrize("sampler_backend", ["auto", "csrc"] if GPU else ["auto", "triton"])
def test_nan_logits_fail_one_request_on_device(tiny_qwen2_dir, sampler_backend):
    """R4 on the device path: the sampler's flag (Triton or csrc kernel) fails the request whose
    prompt holds a NaN-embedding token; the others equal a clean run."""
    import rrm_engine as rrm
    bad_token = 77
    good = [[100 + i for i in range(20)], [300 + i for i in range(33)]]
    bad = [500 + i for i in range(10)] + [bad_token]
    greedy = rrm.SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True)
    make = lambda: rrm.LLM(str(tiny_qwen2_dir), device=DEVICE, dtype=torch.float32, kv_cache_tokens=1024,  # noqa: E731
                           block_size=PAGE, attention_backend="triton", sampler_backend=sampler_backend)
    clean = make().generate(good, greedy)
    llm = make()
    with torch.no_grad():
        llm.loaded.model.model.embed_tokens.weight[bad_token] = float("nan")
    outs = llm.generate([bad] + good, greedy)
    assert outs[0].error is not None and outs[0].request_id in outs[0].error
    assert [c.finish_reason for c in outs[0].outputs] == ["error", "error"]
    assert [[c.token_ids for c in o.outputs] for o in outs[1:]] == [[c.token_ids for c in o.outputs] for o in clean]
    llm.engine.check()


def test_csrc_sampler_backend_matches_triton_greedy(tiny_qwen2_dir, monkeypatch):
    """Build item 5: sampler_backend="csrc" serves all-greedy steps with the CUDA C++ kernel (JIT
    build at start-up on a GPU) and sampled steps with Triton; greedy tokens equal the Triton
    sampler's. Dry run on CPU: the engine cannot build it, so the dispatch is run through
    rrm_engine.core.sampler with the kernel's torch reference standing in."""
    import rrm_engine as rrm
    from rrm_engine.core.sampler import SampleRequest, sample
    if not GPU:
        import rrm_kernels.csrc_ops as csrc_ops
        seen = []

        def stand_in(logits, row_index, splits=None, with_status=False):
            seen.append(row_index.numel())
            return csrc_ops.greedy_argmax_lse_ref(logits, row_index, with_status=with_status)
        monkeypatch.setattr(csrc_ops, "greedy_argmax_lse", stand_in)
        logits = torch.randn(3, 1000)
        greedy = rrm.SamplingParams(temperature=0.0)
        res = sample(logits, [SampleRequest(i, greedy, i, 0) for i in range(3)], backend="csrc")
        assert seen == [3] and [r.token for r in res] == logits.argmax(1).tolist()
        sample(logits, [SampleRequest(0, greedy, 0, 0), SampleRequest(1, rrm.SamplingParams(temperature=1.0), 1, 0)],
               backend="csrc")
        assert seen == [3]  # a sampled row sends the step to the other sampler
        return
    prompts = [[100 + i for i in range(20)], [300 + i for i in range(33)]]
    greedy = rrm.SamplingParams(n=1, temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = {}
    for backend in ("triton", "csrc"):
        llm = rrm.LLM(str(tiny_qwen2_dir), device=DEVICE, dtype=torch.float32, kv_cache_tokens=1024, block_size=PAGE,
                      attention_backend="triton", sampler_backend=backend)
        outs[backend] = [(o.outputs[0].token_ids, o.outputs[0].sampling_logprobs) for o in llm.generate(prompts, greedy)]
    for (t_tok, t_lp), (c_tok, c_lp) in zip(outs["triton"], outs["csrc"]):
        assert t_tok == c_tok
        torch.testing.assert_close(torch.tensor(c_lp), torch.tensor(t_lp), atol=1e-4, rtol=1e-4)


def test_selective_log_softmax_gradient_under_bf16_autocast():
    """B3 where the trainer runs it: bf16 autocast on the device, Triton reduction in forward,
    backward outside autocast; the gradient equals autograd's of the same forward."""
    from rrm_kernels.selective_log_softmax import selective_log_softmax, selective_log_softmax_ref
    gen = torch.Generator().manual_seed(12)
    n, v, h = (512, 32768, 256) if GPU else (32, 300, 16)
    hidden = (torch.randn(n, h, generator=gen) * 2).to(DEVICE).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5 * 8).to(DEVICE).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    grad = torch.randn(n, generator=gen).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = selective_log_softmax(hidden, weight, labels, 0.9, chunk_size=64, backend="triton")
        ref = selective_log_softmax_ref(hidden, weight, labels, 0.9)
    gh, gw = torch.autograd.grad(out, (hidden, weight), grad)
    rh, rw = torch.autograd.grad(ref, (hidden, weight), grad)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    for got, want in ((gh, rh), (gw, rw)):
        assert ((got - want).norm() / want.norm()).item() < 1e-2
