"""Paged decode attention: one new query token per sequence attends to its whole paged context.

Layout (per layer): k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
int32; seq_lens [B] int32 (context including the new token); q [B, Hq, D] with Hq = g * Hkv.

GQA: one program owns one (sequence, kv head, split) and loads each KV tile once for all g query
heads of that kv group (the g heads are the rows of a [G_PAD, D] tile, so QK^T is a tl.dot).
Split-K: long contexts are cut into `num_splits` token ranges; each range writes a partial
(out, log-sum-exp) and a small kernel merges the parts exactly. The same merge serves the
shared-prefix kernel, whose parts are prefix passes plus a per-sequence suffix. How many splits
and how long each is come from the step's DecodePlan (rrm_kernels/decode_plan.py): the split length
is read from device memory, so a CUDA graph captured once keeps split-K at every context length.

All softmax arithmetic is fp32 in base 2 (exp2/log2; scores pre-multiplied by log2(e)).
fp32 inputs ask tl.dot for IEEE precision (no silent TF32 on a GPU: fp32 is the exact path);
fp16/bf16 keep the default, which the tensor cores serve. Page ids are widened to int64 before they scale a
stride, so large caches cannot overflow the address arithmetic.
The per-tile gather and online-softmax step are rrm_kernels.paged_tile's, shared with prefill and the
shared-prefix pass.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .decode_plan import (MAX_SPLITS, MIN_SPLIT_TOKENS, TARGET_PROGRAMS, DecodePlan, choose_num_splits,  # noqa: F401
                          decode_tile, plan_decode, split_len_for)
from .paged_tile import TileConfig, attend_paged_range, check_tile

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q, K, V, BT, KV_START, SEQ_LENS, SPLIT_LEN, O, LSE,
    scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_btb,
    stride_op, stride_ob, stride_oh,
    stride_lp, stride_lb,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_START: tl.constexpr, DIRECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    start = 0
    if HAS_START:
        start = tl.load(KV_START + b)
    split_len = tl.load(SPLIT_LEN)  # from the plan: a graph replays with the step's value
    lo = start + s * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    g = tl.arange(0, G_PAD)
    gmask = g < GROUP
    heads = hk * GROUP + g
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)

    m_i, l_i, acc = attend_paged_range(q, K, V, BT + b * stride_btb, lo, hi, hk, d, dmask, scale_log2,
                                       stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                       G_PAD, D_PAD, PAGE, BLOCK_N, DOT_PRECISION)
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if DIRECT:
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty), mask=omask)
    else:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(O + s * stride_op + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out, mask=omask)
        tl.store(LSE + s * stride_lp + b * stride_lb + heads, lse, mask=gmask)


@triton.jit
def _merge_parts_kernel(
    PO, PLSE, O, ROW_LEVELS,
    num_parts, level_parts, level_splits,
    stride_pp, stride_pb, stride_ph,
    stride_lp, stride_lb,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, P_CHUNK: tl.constexpr,
):
    """out[b, h] = sum_p exp2(lse_p - lse) * out_p over the parts of row b: the first level_parts
    are prefix parts (level p // level_splits, used only below ROW_LEVELS[b]), the rest the
    per-row pass's; parts with lse = -inf (empty ranges) weigh 0 and are not read. P_CHUNK parts
    are loaded at once, folded into a running (max, sum, acc) across chunks."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    levels = tl.load(ROW_LEVELS + b, mask=level_parts > 0, other=0)
    m = tl.max(tl.full([P_CHUNK], float("-inf"), tl.float32), 0)
    total = tl.sum(tl.zeros([P_CHUNK], tl.float32), 0)
    acc = tl.zeros([D_PAD], tl.float32)
    for c in range(0, num_parts, P_CHUNK):
        p = c + tl.arange(0, P_CHUNK)
        pmask = (p < num_parts) & ((p >= level_parts) | (p // tl.maximum(level_splits, 1) < levels))
        lse = tl.load(PLSE + p * stride_lp + b * stride_lb + h, mask=pmask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.where(lse > float("-inf"), tl.exp2(lse - m_safe), 0.0)
        parts = tl.load(PO + p[:, None] * stride_pp + b * stride_pb + h * stride_ph + d[None, :],
                        mask=(pmask & (lse > float("-inf")))[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha + tl.sum(parts * w[:, None], 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new
    tl.store(O + b * stride_ob + h * stride_oh + d, (acc / total).to(O.dtype.element_ty), mask=dmask)


def check_paged_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, num_seqs: int) -> None:
    """Shape/dtype checks that need no device sync; raise ValueError naming the bad argument."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _, page, hkv, d = k_cache.shape
    if page < 1 or page & (page - 1):
        raise ValueError(f"block_size must be a power of two, got {page}")
    if q.shape[-1] != d:
        raise ValueError(f"q head_dim {q.shape[-1]} != cache head_dim {d}")
    if q.shape[-2] % hkv:
        raise ValueError(f"q heads ({q.shape[-2]}) must be a multiple of the cache's kv heads ({hkv})")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} != cache dtype {k_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [{num_seqs}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [{num_seqs}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    if not (q.device == k_cache.device == v_cache.device == block_tables.device == seq_lens.device):
        raise ValueError("q, caches, block_tables and seq_lens must be on one device")
    if seq_lens.device.type == "cpu" and num_seqs:  # value checks are free here; on a GPU they would sync
        cap = block_tables.shape[1] * page
        if (seq_lens < 1).any() or (seq_lens > cap).any():
            raise ValueError(f"seq_lens must lie in [1, {cap}] (block_tables width x block_size), got {seq_lens.tolist()}")


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def g_pad_for(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


def launch_decode_split(q, k_cache, v_cache, block_tables, seq_lens, plan: DecodePlan, scale, out_parts, lse_parts,
                        direct: bool = False) -> None:
    """The per-row split-K pass: row b's keys [plan.kv_start[b] (0 without levels), seq_len) in
    plan.cap.splits ranges of the plan's split length, written to out_parts[s] / lse_parts[s]
    (fp32, lse in base 2). direct (one split, no levels): the normalised output goes straight to
    out_parts [B, Hq, D] in q's dtype, no merge needed."""
    b, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    group = hq // hkv
    part_strides = (0, out_parts.stride(0), out_parts.stride(1), 0, 0) if direct else (
        out_parts.stride(0), out_parts.stride(1), out_parts.stride(2), lse_parts.stride(0), lse_parts.stride(1))
    _decode_split_kernel[(b, hkv, plan.cap.splits)](
        q, k_cache, v_cache, block_tables, plan.kv_start, seq_lens, plan.split_len,
        out_parts, lse_parts, scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *part_strides,
        GROUP=group, G_PAD=g_pad_for(group), HEAD_DIM=d, D_PAD=triton.next_power_of_2(d),
        PAGE=page, BLOCK_N=plan.suffix_tile.block_n, HAS_START=plan.has_levels, DIRECT=direct,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=plan.suffix_tile.num_warps,
    )


def merge_parts(out_parts: torch.Tensor, lse_parts: torch.Tensor, out: torch.Tensor,
                plan: DecodePlan | None = None) -> torch.Tensor:
    """Exact log-sum-exp merge of [P, B, Hq, D] partial outputs into out [B, Hq, D]; with a plan
    that has levels, a row's level parts count only for the levels that cover it."""
    p, b, hq, d = out_parts.shape
    level_parts, level_splits = (plan.prefix_parts, plan.cap.prefix_splits) if plan is not None else (0, 0)
    _merge_parts_kernel[(out.shape[0], hq)](
        out_parts, lse_parts, out, plan.row_levels if plan is not None else lse_parts,
        p, level_parts, level_splits,
        out_parts.stride(0), out_parts.stride(1), out_parts.stride(2),
        lse_parts.stride(0), lse_parts.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), P_CHUNK=min(16, max(2, triton.next_power_of_2(p))),
        num_warps=1 if d <= 64 else 2,
    )
    return out


def decode_with_plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, plan: DecodePlan, out: torch.Tensor) -> torch.Tensor:
    """The per-row pass and the merge of a planned step (a plan with levels: after the prefix
    pass wrote its parts, see shared_prefix_decode.decode_attention). q [B, Hq, D], B <= plan rows."""
    if plan.direct:  # one range per row: write the normalised output directly, no merge pass
        launch_decode_split(q, k_cache, v_cache, block_tables, seq_lens, plan, scale, out, out, direct=True)
        return out
    out_parts, lse_parts = plan.parts(q.device)
    base = plan.prefix_parts
    launch_decode_split(q, k_cache, v_cache, block_tables, seq_lens, plan, scale, out_parts[base:], lse_parts[base:])
    return merge_parts(out_parts, lse_parts, out, plan)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                           max_seq_len: int | None = None, tile: TileConfig | None = None,
                           plan: DecodePlan | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D]. Every seq_lens[b] must be >= 1.

    max_seq_len: a host-side bound on seq_lens (the runner knows it); without it the bound is
    taken from the block table's width, so no device sync happens either way.
    tile: launch shape (block_n, num_warps) instead of decode_tile's (tuning sweeps).
    plan: a DecodePlan built once for the step (plan_decode), instead of one per call.
    out: where to write (e.g. the decode rows of a mixed step's output)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    b, hq, d = q.shape
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, b)
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    if plan is None:
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page
        plan = plan_decode(b, hq, hkv, d, page, q.device, max_seq_len=bound, num_splits=num_splits,
                           suffix_tile=check_tile(tile) if tile is not None else None)
    return decode_with_plan(q, k_cache, v_cache, block_tables, seq_lens, scale, plan, out)


def gather_context(k_cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Tokens [start, end) of one sequence as [end - start, Hkv, D] (reference helper)."""
    page = k_cache.shape[1]
    idx = torch.arange(start, end, device=k_cache.device)
    blocks = block_table.long()[idx // page]
    return k_cache[blocks, idx % page]


def attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [M, Hq, D] attends to all of k/v [N, Hkv, D] (GQA by repeat), fp32 softmax."""
    g = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(g, dim=1)
    v = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q.float(), k) * scale
    return torch.einsum("hmn,nhd->mhd", s.softmax(-1), v)


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                               max_seq_len: int | None = None) -> torch.Tensor:
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        k = gather_context(k_cache, block_tables[b], 0, n)
        v = gather_context(v_cache, block_tables[b], 0, n)
        out[b] = attend_ref(q[b:b + 1], k, v, scale)[0].to(q.dtype)
    return out
