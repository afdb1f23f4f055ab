"""Per-kernel benchmark: `python -m bench.kernels [--only NAME] [--quick] [--sweep]`.

Every kernel is timed beside its torch reference and the best library baseline present (torch
SDPA for attention, a torch sort-based top-p sampler for sampling), all in the same run, and each
line prints its achieved GB/s and TFLOP/s against this device's copy bandwidth (a large tensor
copy) and matmul rate (a large mm) measured at the start of the same run.

GPU: median of triton.testing.do_bench, the DESIGN.md target shapes (RRM-7B: 28 q heads, 4 kv
heads, head_dim 128, bf16). CPU: a plain wall-clock timer, small shapes,
and only the torch paths (Triton on CPU is an interpreter, so timing it means nothing);
the best of a few runs there, since on a shared CPU other tenants only ever add time.

--sweep (GPU): also times each attention kernel at alternative launch tiles (rrm_kernels.paged_tile.
TileConfig: rows per program, keys per tile, warps) and the sampler at 1, 2 and 4 samples per
program, one line each, so the defaults (decode_tile, prefix_tile, prefill_tile,
sampling.sample_launch) can be chosen from one run. `python -m bench.ptxas_report --sweep` says
which of those tiles spill registers, without a GPU.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

PAGE = 16


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    sweep: bool = False

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Impl:
    name: str  # "kernel", "reference", or the baseline's name
    fn: Callable[[], object]
    gpu_only: bool = False  # a Triton / CUDA path: not timed on CPU


@dataclass
class Case:
    name: str
    shape: str
    impls: list[Impl]
    bytes_moved: float  # the minimum traffic of the op, for GB/s
    flops: float = 0.0
    baseline: str = "reference"  # the impl the speedups are measured against (first timed one if absent)


def timer(setup: Setup) -> Callable[[Callable[[], object]], float]:
    """Seconds per call: do_bench median on GPU, best of a few wall-clock runs on CPU."""
    if setup.gpu:
        import triton.testing
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3

    def cpu_time(fn: Callable[[], object]) -> float:
        # the minimum, not the median: on a shared CPU the other tenants only ever add time
        fn()
        runs = []
        for _ in range(5 if setup.quick else 11):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return min(runs)
    return cpu_time


def measure_roofline(setup: Setup, time_fn) -> tuple[float, float]:
    """(copy GB/s counting read + write, matmul TFLOP/s) measured now on this device."""
    n = (1 << 28) if setup.gpu else (1 << 25)  # bytes per buffer: beyond CPU caches too
    src = torch.empty(n, dtype=torch.uint8, device=setup.device)
    dst = torch.empty_like(src)
    copy_s = time_fn(lambda: dst.copy_(src))
    m = 8192 if setup.gpu else (512 if setup.quick else 1024)
    mm_dtype = torch.bfloat16 if setup.gpu else torch.float32
    a = torch.randn(m, m, device=setup.device, dtype=mm_dtype)
    b = torch.randn(m, m, device=setup.device, dtype=mm_dtype)
    mm_s = time_fn(lambda: a @ b)
    return 2 * n / copy_s / 1e9, 2 * m ** 3 / mm_s / 1e12


def tile_variants(s: Setup, run: Callable[..., object], block_m: tuple[int, ...], block_n: tuple[int, ...],
                  warps: tuple[int, ...]) -> list[Impl]:
    """With --sweep: the kernel at each alternative tile, `run(tile=...)` (timed on a GPU only)."""
    if not s.sweep:
        return []
    from rrm_kernels.paged_tile import TileConfig
    return [Impl(f"kernel m{m} n{n} w{w}", lambda t=TileConfig(m, n, w): run(tile=t), gpu_only=True)
            for m, n, w in itertools.product(block_m, block_n, warps)]


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        print(f"  (skipping {name}: {e})")
        return None


# ------------------------------------------------------------------------------------- sampling

def torch_sort_top_p(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The usual torch sampler: softmax, full sort, cumsum mask, multinomial."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    sorted_p = sorted_p.masked_fill(cum - sorted_p >= top_p, 0.0)
    return order.gather(-1, torch.multinomial(sorted_p, 1))[:, 0]


def sampling_cases(s: Setup) -> list[Case]:
    sampling = _module("rrm_kernels.sampling")
    if sampling is None:
        return []
    rows, vocab = (256, 152064) if s.gpu else ((16, 8192) if s.quick else (64, 32000))
    logits = torch.randn(rows, vocab, device=s.device, dtype=s.dtype) * 3
    dev = s.device

    def params(temperature: float, top_k: int, top_p: float) -> dict:
        return dict(row_index=torch.arange(rows, device=dev), temperature=torch.full((rows,), temperature, device=dev),
                    top_k=torch.full((rows,), top_k, dtype=torch.int32, device=dev),
                    top_p=torch.full((rows,), top_p, device=dev), min_p=torch.zeros(rows, device=dev),
                    seeds=torch.arange(rows, device=dev), offsets=torch.zeros(rows, dtype=torch.int64, device=dev))
    top_p = params(0.6, 0, 0.95)
    top_k_p = params(0.6, 50, 0.95)
    greedy = params(0.0, 0, 1.0)
    nbytes = logits.numel() * logits.element_size()
    shape = f"[{rows}, {vocab}] {str(s.dtype).removeprefix('torch.')}"
    cases = [
        Case("sample top-p 0.95", shape, [
            Impl("kernel", lambda: sampling.sample_triton(logits, **top_p, validate=False), gpu_only=True),
            Impl("reference", lambda: sampling.sample_ref(logits, **top_p, validate=False)),
            Impl("torch sort top-p", lambda: torch_sort_top_p(logits, 0.6, 0.95)),
            *([Impl(f"kernel block_b={bb}", lambda bb=bb: sampling.sample_triton(logits, **top_p, validate=False,
                                                                                  block_b=bb), gpu_only=True)
               for bb in (1, 2, 4)] if s.sweep else []),
        ], nbytes, baseline="torch sort top-p"),
        Case("sample top-k 50 + top-p", shape, [
            Impl("kernel", lambda: sampling.sample_triton(logits, **top_k_p, validate=False), gpu_only=True),
            Impl("reference", lambda: sampling.sample_ref(logits, **top_k_p, validate=False)),
            Impl("torch sort top-p", lambda: torch_sort_top_p(logits, 0.6, 0.95)),
        ], nbytes, baseline="torch sort top-p"),
    ]
    greedy_impls = [
        Impl("kernel", lambda: sampling.sample_triton(logits, **greedy, validate=False, all_greedy=True), gpu_only=True),
        Impl("reference", lambda: sampling.sample_ref(logits, **greedy, validate=False)),
        Impl("torch backend (greedy dispatch)", lambda: sampling.sample(logits, **greedy, validate=False,
                                                                        backend="torch", all_greedy=True)),
        Impl("torch argmax+log_softmax",
             lambda: torch.log_softmax(logits.float(), -1).gather(1, logits.argmax(-1, keepdim=True))),
    ]
    csrc = _module("rrm_kernels.csrc_ops")
    if csrc is not None and csrc.available():
        greedy_impls.insert(1, Impl("csrc", lambda: csrc.greedy_argmax_lse(logits, greedy["row_index"]), gpu_only=True))
    cases.append(Case("sample greedy", shape, greedy_impls, nbytes, baseline="torch argmax+log_softmax"))
    small = rows // 32 or 1  # a decode step with few sequences: where splitting rows matters
    small_greedy = {k: v[:small] for k, v in greedy.items()}
    small_impls = [
        Impl("kernel", lambda: sampling.sample_triton(logits, **small_greedy, validate=False, all_greedy=True),
             gpu_only=True),
        Impl("torch argmax+log_softmax", lambda: torch.log_softmax(logits[:small].float(), -1)
             .gather(1, logits[:small].argmax(-1, keepdim=True))),
    ]
    if csrc is not None and csrc.available():
        small_impls.insert(1, Impl("csrc", lambda: csrc.greedy_argmax_lse(logits, small_greedy["row_index"]),
                                   gpu_only=True))
    cases.append(Case("sample greedy, few rows", f"[{small}, {vocab}]", small_impls, nbytes * small / rows,
                      baseline="torch argmax+log_softmax"))
    return cases


def logprob_cases(s: Setup) -> list[Case]:
    sls = _module("rrm_kernels.selective_log_softmax")
    if sls is None:
        return []
    n, v, h = (4096, 152064, 3584) if s.gpu else ((128, 4096, 128) if s.quick else (512, 16384, 256))
    hidden = torch.randn(n, h, device=s.device, dtype=s.dtype)
    weight = torch.randn(v, h, device=s.device, dtype=s.dtype) * h ** -0.5
    labels = torch.randint(0, v, (n,), device=s.device)
    logits = hidden @ weight.T
    esz = hidden.element_size()
    return [
        Case("selective log-softmax fwd", f"N={n} V={v} H={h}", [
            Impl("chunked", lambda: sls.selective_log_softmax(hidden, weight, labels, chunk_size=1024)),
            Impl("reference (full fp32 logits)", lambda: sls.selective_log_softmax_ref(hidden, weight, labels)),
        ], (n * h + v * h) * esz, 2.0 * n * v * h, baseline="reference (full fp32 logits)"),
        Case("token logprobs from logits", f"[{n}, {v}]", [
            Impl("kernel", lambda: sls.token_logprobs(logits, labels, backend="triton"), gpu_only=True),
            Impl("chunked torch", lambda: sls.token_logprobs(logits, labels, backend="torch")),
            Impl("log_softmax+gather", lambda: torch.log_softmax(logits.float(), -1).gather(1, labels[:, None])),
        ], logits.numel() * esz, baseline="log_softmax+gather"),
    ]


# ------------------------------------------------------------------------------------ attention

def _paged_batch(s: Setup, lens: list[int], hkv: int, d: int, prefix_blocks: list[list[int]] | None = None,
                 first_block: int = 0):
    """Block tables for sequences of the given lengths, blocks laid out scattered."""
    need = [-(-n // PAGE) for n in lens]
    own = [n - (len(prefix_blocks[i]) if prefix_blocks else 0) for i, n in enumerate(need)]
    total = first_block + sum(own)
    perm = (torch.randperm(sum(own)) + first_block).tolist()
    rows, i = [], 0
    for b, n in enumerate(own):
        row = (prefix_blocks[b] if prefix_blocks else []) + perm[i:i + n]
        i += n
        rows.append(row + [0] * (max(need) - len(row)))
    kc = torch.randn(total, PAGE, hkv, d, device=s.device, dtype=s.dtype)
    vc = torch.randn_like(kc)
    return kc, vc, torch.tensor(rows, dtype=torch.int32, device=s.device)


def _dense(kc: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """[B, Hkv, L, D] contiguous copy of each sequence's context (the SDPA baseline's input)."""
    b = tables.shape[0]
    return kc[tables.long()].reshape(b, -1, *kc.shape[2:])[:, :length].transpose(1, 2).contiguous()


def _attn_dims(s: Setup) -> tuple[int, int, int, float, int]:
    hq, hkv, d = (28, 4, 128) if s.gpu else (4, 2, 32)
    return hq, hkv, d, d ** -0.5, torch.empty(0, dtype=s.dtype).element_size()


# one function per case: the timed lambdas close over their own tensors (a shared scope would
# let a later case rebind `kc` under an earlier case's lambda)
def _planned(make_plan: Callable, run: Callable) -> Callable[..., object]:
    """run(plan, tile) with the step's plan built once per tile, outside the timed calls (the
    engine builds it once per step and every layer reuses it)."""
    plans: dict = {}

    def call(tile=None):
        if tile not in plans:
            plans[tile] = make_plan(tile)
        return run(plans[tile], tile)
    return call


def decode_cases(s: Setup) -> list[Case]:
    hq, hkv, d, scale, esz = _attn_dims(s)
    cases = []
    decode = _module("rrm_kernels.paged_decode")
    if decode is not None:
        from rrm_kernels.decode_plan import plan_decode
        b, ctx = (64, 4096) if s.gpu else ((4, 256) if s.quick else (8, 1024))
        kc, vc, bt = _paged_batch(s, [ctx] * b, hkv, d)
        q = torch.randn(b, hq, d, device=s.device, dtype=s.dtype)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=s.device)
        kd, vd = _dense(kc, bt, ctx), _dense(vc, bt, ctx)
        kernel = _planned(lambda tile: plan_decode(b, hq, hkv, d, PAGE, s.device, max_seq_len=ctx, suffix_tile=tile),
                          lambda plan, tile: decode.paged_decode_attention(q, kc, vc, bt, lens, scale, plan=plan))
        cases.append(Case("paged decode", f"B={b} ctx={ctx} Hq={hq} Hkv={hkv} D={d}", [
            Impl("kernel", kernel, gpu_only=True),
            Impl("reference", lambda: decode.paged_decode_attention_ref(q, kc, vc, bt, lens, scale)),
            Impl("torch SDPA (dense KV)", lambda: F.scaled_dot_product_attention(
                q[:, :, None], kd, vd, scale=scale, enable_gqa=True)),
            *tile_variants(s, kernel, (16,), (16, 32, 64), (4, 8)),
        ], 2 * b * ctx * hkv * d * esz, 4.0 * b * ctx * hq * d, baseline="torch SDPA (dense KV)"))
    return cases


def shared_prefix_cases(s: Setup) -> list[Case]:
    hq, hkv, d, scale, esz = _attn_dims(s)
    cases = []
    decode = _module("rrm_kernels.paged_decode")
    shared = _module("rrm_kernels.shared_prefix_decode")
    if shared is not None and decode is not None:
        from rrm_kernels.decode_plan import HostLevel, plan_decode
        groups, votes, prefix, suffix = (8, 8, 4096, 256) if s.gpu else ((1, 4, 256, 32) if s.quick else (2, 8, 1024, 64))
        b = groups * votes
        pblocks = prefix // PAGE
        group_blocks = [list(range(g * pblocks, (g + 1) * pblocks)) for g in range(groups)]
        kc, vc, bt = _paged_batch(s, [prefix + suffix] * b, hkv, d, [group_blocks[i // votes] for i in range(b)],
                                  first_block=groups * pblocks)
        q = torch.randn(b, hq, d, device=s.device, dtype=s.dtype)
        lens = torch.full((b,), prefix + suffix, dtype=torch.int32, device=s.device)
        host = HostLevel(group_blocks, [prefix] * groups, [i // votes for i in range(b)])
        level = (torch.tensor(group_blocks, dtype=torch.int32, device=s.device),
                 torch.full((groups,), prefix, dtype=torch.int32, device=s.device),
                 torch.arange(b, dtype=torch.int32, device=s.device) // votes)
        ctx = prefix + suffix
        unique = (groups * prefix + b * suffix) * 2 * hkv * d * esz
        kernel = _planned(lambda tile: plan_decode(b, hq, hkv, d, PAGE, s.device, max_seq_len=ctx, seq_lens=[ctx] * b,
                                                   levels=[host], tile=tile),
                          lambda plan, tile: shared.shared_prefix_decode_attention(q, kc, vc, bt, lens, [level], scale,
                                                                                   plan=plan))
        plain = _planned(lambda tile: plan_decode(b, hq, hkv, d, PAGE, s.device, max_seq_len=ctx),
                         lambda plan, tile: decode.paged_decode_attention(q, kc, vc, bt, lens, scale, plan=plan))
        cases.append(Case("shared-prefix decode", f"{groups}x{votes} votes, prefix={prefix} suffix={suffix}", [
            Impl("kernel", kernel, gpu_only=True),
            Impl("paged decode (same batch)", plain, gpu_only=True),
            Impl("reference", lambda: shared.shared_prefix_decode_attention_ref(q, kc, vc, bt, lens, [level], scale)),
            *tile_variants(s, kernel, (32, 64, 128), (16, 32, 64), (4, 8)),
        ], unique, 4.0 * b * ctx * hq * d, baseline="paged decode (same batch)"))
        cases.append(_prefix_tree_case(s, decode, shared))
    return cases


def _prefix_tree_case(s: Setup, decode, shared) -> Case:
    """RRM judging with two queries in flight: a system prompt every row shares (level 0), each
    query's prompt shared by its comparisons (level 1), each comparison's responses by its votes
    (level 2); the prefix tree the runner builds, against plain paged decode of the same batch."""
    from rrm_kernels.decode_plan import HostLevel, plan_decode
    hq, hkv, d, scale, esz = _attn_dims(s)
    queries, pairs, votes = (2, 4, 8) if s.gpu else (2, 2, 2)
    sys_len, q_len, pair_len, suffix = (512, 1024, 2560, 256) if s.gpu else (32, 64, 128, 16)
    b = queries * pairs * votes
    blocks = iter(range(1 << 30))
    take = lambda n: [next(blocks) for _ in range(n // PAGE)]  # noqa: E731
    sys_b = take(sys_len)
    q_b = [take(q_len) for _ in range(queries)]
    p_b = [take(pair_len) for _ in range(queries * pairs)]
    heads = [sys_b + q_b[r // (pairs * votes)] + p_b[r // votes] for r in range(b)]
    first = len(sys_b) + sum(map(len, q_b)) + sum(map(len, p_b))
    ctx = sys_len + q_len + pair_len + suffix
    kc, vc, bt = _paged_batch(s, [ctx] * b, hkv, d, heads, first_block=first)
    q = torch.randn(b, hq, d, device=s.device, dtype=s.dtype)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=s.device)
    levels = [HostLevel([sys_b], [sys_len], [0] * b),
              HostLevel(q_b, [q_len] * queries, [r // (pairs * votes) for r in range(b)]),
              HostLevel(p_b, [pair_len] * (queries * pairs), [r // votes for r in range(b)])]
    kernel = _planned(lambda tile: plan_decode(b, hq, hkv, d, PAGE, s.device, max_seq_len=ctx, seq_lens=[ctx] * b,
                                               levels=levels, tile=tile),
                      lambda plan, tile: shared.decode_attention(q, kc, vc, bt, lens, scale, plan))
    plain = _planned(lambda tile: plan_decode(b, hq, hkv, d, PAGE, s.device, max_seq_len=ctx),
                     lambda plan, tile: decode.paged_decode_attention(q, kc, vc, bt, lens, scale, plan=plan))
    unique = (sys_len + queries * q_len + queries * pairs * pair_len + b * suffix) * 2 * hkv * d * esz
    return Case("prefix-tree decode", f"{queries} queries x {pairs} pairs x {votes} votes, ctx={ctx} (3 levels)", [
        Impl("kernel", kernel, gpu_only=True),
        Impl("paged decode (same batch)", plain, gpu_only=True),
        Impl("reference", lambda: decode.paged_decode_attention_ref(q, kc, vc, bt, lens, scale)),
    ], unique, 4.0 * b * ctx * hq * d, baseline="paged decode (same batch)")


def prefill_cases(s: Setup) -> list[Case]:
    hq, hkv, d, scale, esz = _attn_dims(s)
    cases = []
    prefill = _module("rrm_kernels.paged_prefill")
    if prefill is not None:
        t = 2048 if s.gpu else (128 if s.quick else 512)
        kc, vc, bt = _paged_batch(s, [t], hkv, d)
        q = torch.randn(t, hq, d, device=s.device, dtype=s.dtype)
        qsl = torch.tensor([0, t], dtype=torch.int32, device=s.device)
        lens = torch.tensor([t], dtype=torch.int32, device=s.device)
        kd, vd = _dense(kc, bt, t), _dense(vc, bt, t)
        qd = q.transpose(0, 1)[None].contiguous()
        cases.append(Case("paged prefill", f"T={t} Hq={hq} Hkv={hkv} D={d}", [
            Impl("kernel", lambda: prefill.paged_prefill_attention(q, kc, vc, bt, qsl, lens, scale, t), gpu_only=True),
            Impl("reference", lambda: prefill.paged_prefill_attention_ref(q, kc, vc, bt, qsl, lens, scale, t)),
            Impl("torch SDPA causal (dense)", lambda: F.scaled_dot_product_attention(
                qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True)),
            *tile_variants(s, lambda tile: prefill.paged_prefill_attention(q, kc, vc, bt, qsl, lens, scale, t, tile=tile),
                           (64, 128), (32, 64), (4, 8)),
        ], (2 * t * hq * d + 2 * t * hkv * d) * esz, 2.0 * t * t * hq * d, baseline="torch SDPA causal (dense)"))  # causal: half of 4*T^2*Hq*D
    return cases


def rmsnorm_cases(s: Setup) -> list[Case]:
    cases = []
    hidden = 3584 if s.gpu else 256
    tokens = 4096 if s.gpu else (64 if s.quick else 512)
    esz = torch.empty(0, dtype=s.dtype).element_size()
    rms = _module("rrm_kernels.rmsnorm")
    if rms is not None:
        x = torch.randn(tokens, hidden, device=s.device, dtype=s.dtype)
        r = torch.randn_like(x)
        w = torch.randn(hidden, device=s.device, dtype=s.dtype)
        cases.append(Case("rmsnorm + residual", f"[{tokens}, {hidden}]", [
            Impl("kernel", lambda: rms.rms_norm(x, w, 1e-6, residual=r), gpu_only=True),
            Impl("reference", lambda: rms.rms_norm_ref(x, w, 1e-6, residual=r)),
        ], 4 * x.numel() * esz))
    return cases


def rope_cases(s: Setup) -> list[Case]:
    cases = []
    tokens = 4096 if s.gpu else (64 if s.quick else 512)
    esz = torch.empty(0, dtype=s.dtype).element_size()
    rope = _module("rrm_kernels.rope_store")
    if rope is not None:
        hq, hkv, d = (28, 4, 128) if s.gpu else (4, 2, 32)
        q = torch.randn(tokens, hq, d, device=s.device, dtype=s.dtype)
        k = torch.randn(tokens, hkv, d, device=s.device, dtype=s.dtype)
        v = torch.randn_like(k)
        pos = torch.arange(tokens, device=s.device)
        freqs = pos.float()[:, None] * (10000.0 ** (-torch.arange(0, d, 2, device=s.device).float() / d))
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos().to(s.dtype), emb.sin().to(s.dtype)
        blocks = -(-tokens // PAGE)
        kc = torch.zeros(blocks, PAGE, hkv, d, device=s.device, dtype=s.dtype)
        vc = torch.zeros_like(kc)
        slots = torch.arange(tokens, device=s.device)
        cases.append(Case("rope + kv store", f"T={tokens} Hq={hq} Hkv={hkv} D={d}", [
            Impl("kernel", lambda: rope.rope_and_store(q, k, v, pos, cos, sin, kc, vc, slots), gpu_only=True),
            Impl("reference", lambda: rope.rope_and_store_ref(q, k, v, pos, cos, sin, kc, vc, slots)),
        ], (2 * q.numel() + 4 * k.numel()) * esz))
    return cases


# SmolLM2-135M's linears (fused q/k/v and gate/up, as the decoder runs them) and its tied LM head
SMOLLM2_LINEARS = (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
                   ("lm head", 49152, 576))


def quant_linear_cases(s: Setup) -> list[Case]:
    """CPU: the GGUF-block linear (rrm_kernels/csrc/quant_linear_cpu.cpp) beside torch's fp32 and bf16 F.linear at
    decode shapes (M rows = the batch of a decode step). GB/s counts the Q4_1 blocks (the least the
    weights can move); the LM head is Q8_0 as in the embedded GGUF."""
    if s.gpu:
        return []
    ql = _module("rrm_kernels.quant_linear_cpu")
    if ql is None or not ql.available():
        return []
    cases = []
    isas = ql.supported_isas()
    shapes = SMOLLM2_LINEARS[1:3] if s.quick else SMOLLM2_LINEARS
    for (name, n, k), m in itertools.product(shapes, (8,) if s.quick else (8, 16, 32)):
        g = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=g) * 0.02
        wb = w.bfloat16()
        x = torch.randn(m, k, generator=g)
        fmt = "q8_0" if name == "lm head" else "q4_1"
        packed = {f: ql.PackedWeight.from_dense(w, f) for f in ("q4_1", "q8_0")}
        # every lambda binds its tensors now: the loop rebinds x, w and wb
        impls = [Impl(f"{f} {isa}", (lambda x=x, p=packed[f], i=isa: ql.quant_linear(x, p, isa=i)))
                 for f in ("q4_1", "q8_0") for isa in isas if isa != "scalar" or s.quick]
        impls += [Impl("torch fp32", lambda x=x, w=w: F.linear(x, w)),
                  Impl("torch bf16", lambda x=x, wb=wb: F.linear(x.bfloat16(), wb).float())]
        cases.append(Case(f"linear {name}", f"M={m} N={n} K={k}, GB/s of {fmt}", impls, packed[fmt].nbytes,
                          2.0 * m * n * k, baseline="torch fp32"))
    return cases


GROUPS = [sampling_cases, logprob_cases, decode_cases, shared_prefix_cases, prefill_cases, rmsnorm_cases,
          rope_cases, quant_linear_cases]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="run only cases whose name contains this (e.g. 'sample', 'decode')")
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    ap.add_argument("--sweep", action="store_true", help="GPU: also time the attention kernels at alternative tiles")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup = Setup(device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.quick, args.sweep)
    time_fn = timer(setup)
    name = torch.cuda.get_device_name() if setup.gpu else "CPU"
    print(f"device: {name} ({torch.get_num_threads()} threads)" if not setup.gpu else f"device: {name}")
    if not setup.gpu:
        print("CPU run: torch paths only, plain wall-clock timer (best of 5-11 runs); Triton/CUDA kernels are not timed here.\n"
              "Small cache-resident shapes can exceed 100% of the copy bandwidth, which is measured out of cache.")
        if args.sweep:
            print("--sweep times Triton kernels, so it does nothing on CPU.")
    copy_gbs, mm_tflops = measure_roofline(setup, time_fn)
    print(f"measured now: copy {copy_gbs:.1f} GB/s (read+write), "
          f"{'bf16' if setup.gpu else 'fp32'} matmul {mm_tflops:.2f} TFLOP/s\n")
    print(f"{'case / impl':40} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'TFLOP/s':>8} {'%mm':>5} {'speedup':>8}")
    for group in GROUPS:
        for case in group(setup):
            if args.only and args.only.lower() not in case.name.lower():
                continue
            timed = [(impl.name, time_fn(impl.fn)) for impl in case.impls if setup.gpu or not impl.gpu_only]
            if not timed:
                continue
            base_name, base = next(((n, t) for n, t in timed if n == case.baseline), timed[0])
            print(f"{case.name} ({case.shape}); speedup = time of '{base_name}' / time")
            for impl_name, sec in timed:
                gbs = case.bytes_moved / sec / 1e9
                tfl = case.flops / sec / 1e12
                print(f"  {impl_name:38} {sec * 1e3:9.3f} {gbs:8.1f} {100 * gbs / copy_gbs:5.0f}% "
                      f"{tfl:8.3f} {100 * tfl / mm_tflops:4.0f}% {base / sec:7.2f}x")


if __name__ == "__main__":
    main()
