"""Paged decode attention: one new query token per sequence attends to its whole paged context.

Layout (per layer): k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
int32; seq_lens [B] int32 (context including the new token); q [B, Hq, D] with Hq = g * Hkv.

GQA: one program owns one (sequence, kv head, split) and loads each KV tile once for all g query
heads of that kv group (the g heads are the rows of a [G_PAD, D] tile, so QK^T is a tl.dot).
Split-K: long contexts are cut into `num_splits` token ranges; each range writes a partial
(out, log-sum-exp) and a small kernel merges the parts exactly. The same merge serves the
shared-prefix kernel, whose parts are prefix passes plus a per-sequence suffix.

All softmax arithmetic is fp32 in base 2 (exp2/log2; scores pre-multiplied by log2(e)).
fp32 inputs ask tl.dot for IEEE precision (no silent TF32 on a GPU: fp32 is the exact path);
fp16/bf16 keep the default, which the tensor cores serve. Page ids are widened to int64 before they scale a
stride, so large caches cannot overflow the address arithmetic.
The per-tile gather and online-softmax step are kernels.paged_tile's, shared with prefill and the
shared-prefix pass.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .paged_tile import TileConfig, attend_paged_range, check_tile

LOG2E = 1.4426950408889634
# A split covers at least this many tokens: below it the merge costs more than the parallelism gains.
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 16
# Aim for about two programs per SM (H100: 132 SMs) before splitting further along the context.
TARGET_PROGRAMS = 264


@triton.jit
def _decode_split_kernel(
    Q, K, V, BT, KV_START, SEQ_LENS, O, LSE,
    scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_btb,
    stride_op, stride_ob, stride_oh,
    stride_lp, stride_lb,
    split_len,
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
    PO, PLSE, O,
    num_parts,
    stride_pp, stride_pb, stride_ph,
    stride_lp, stride_lb,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, P_PAD: tl.constexpr,
):
    """out[b, h] = sum_p exp2(lse_p - lse) * out_p; parts with lse = -inf (empty ranges) weigh 0."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.arange(0, P_PAD)
    pmask = p < num_parts
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    lse = tl.load(PLSE + p * stride_lp + b * stride_lb + h, mask=pmask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)
    parts = tl.load(PO + p[:, None] * stride_pp + b * stride_pb + h * stride_ph + d[None, :],
                    mask=(pmask & (lse > float("-inf")))[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty), mask=dmask)


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


def choose_num_splits(max_seq_len: int, num_seqs: int, num_kv_heads: int) -> int:
    """Enough programs to fill the GPU, but never a split shorter than MIN_SPLIT_TOKENS."""
    by_len = max(1, -(-max_seq_len // MIN_SPLIT_TOKENS))
    by_occupancy = max(1, -(-TARGET_PROGRAMS // max(1, num_seqs * num_kv_heads)))
    return max(1, min(by_len, by_occupancy, MAX_SPLITS))


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def decode_tile(page: int) -> TileConfig:
    """Decode rows are the g query heads of one kv head (padded to G_PAD), so only BLOCK_N and
    the warps are free: tiles of >= 16 keys (tl.dot) that may cover several small pages. ptxas
    reports no spills for this at sm_90 for head_dim 64 and 128 (tests/test_csrc_build.py)."""
    return TileConfig(block_m=16, block_n=max(16, min(64, page)), num_warps=4)


def g_pad_for(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


def launch_decode_split(q, k_cache, v_cache, block_tables, seq_lens, kv_start, scale, out_parts, lse_parts,
                        num_splits: int, split_len: int, tile: TileConfig, direct: bool = False) -> None:
    """Partial decode over [kv_start, seq_len) cut into num_splits ranges of split_len tokens,
    written to out_parts[s] / lse_parts[s] (fp32, lse in base 2). direct (one split, no start):
    the normalised output goes straight to out_parts [B, Hq, D] in q's dtype, no merge needed."""
    b, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    group = hq // hkv
    part_strides = (0, out_parts.stride(0), out_parts.stride(1), 0, 0) if direct else (
        out_parts.stride(0), out_parts.stride(1), out_parts.stride(2), lse_parts.stride(0), lse_parts.stride(1))
    _decode_split_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, kv_start if kv_start is not None else seq_lens, seq_lens,
        out_parts, lse_parts, scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *part_strides,
        split_len,
        GROUP=group, G_PAD=g_pad_for(group), HEAD_DIM=d, D_PAD=triton.next_power_of_2(d),
        PAGE=page, BLOCK_N=tile.block_n, HAS_START=kv_start is not None, DIRECT=direct,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=tile.num_warps,
    )


def merge_parts(out_parts: torch.Tensor, lse_parts: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Exact log-sum-exp merge of [P, B, Hq, D] partial outputs into out [B, Hq, D]."""
    p, b, hq, d = out_parts.shape
    _merge_parts_kernel[(b, hq)](
        out_parts, lse_parts, out, p,
        out_parts.stride(0), out_parts.stride(1), out_parts.stride(2),
        lse_parts.stride(0), lse_parts.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), P_PAD=max(2, triton.next_power_of_2(p)),
        num_warps=1 if d <= 64 else 2,
    )
    return out


def split_len_for(max_seq_len: int, num_splits: int, block_n: int) -> int:
    per = -(-max_seq_len // num_splits)
    return -(-per // block_n) * block_n  # whole tiles, so only the last tile of a split is masked


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                           max_seq_len: int | None = None, tile: TileConfig | None = None) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D]. Every seq_lens[b] must be >= 1.

    max_seq_len: a host-side bound on seq_lens (the runner knows it); without it the bound is
    taken from the block table's width, so no device sync happens either way.
    tile: launch shape (block_n, num_warps) instead of decode_tile's (tuning sweeps)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    b, hq, d = q.shape
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, b)
    out = torch.empty_like(q)
    if b == 0:
        return out
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page
    if num_splits is None:
        num_splits = choose_num_splits(bound, b, hkv)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    tile = check_tile(tile) if tile is not None else decode_tile(page)
    split_len = split_len_for(bound, num_splits, tile.block_n)
    if num_splits == 1:  # one range per sequence: write the normalised output directly, no merge pass
        launch_decode_split(q, k_cache, v_cache, block_tables, seq_lens, None, scale, out, out, 1, split_len, tile,
                            direct=True)
        return out
    out_parts = torch.empty((num_splits, b, hq, d), dtype=torch.float32, device=q.device)
    lse_parts = torch.empty((num_splits, b, hq), dtype=torch.float32, device=q.device)
    launch_decode_split(q, k_cache, v_cache, block_tables, seq_lens, None, scale, out_parts, lse_parts,
                        num_splits, split_len, tile)
    return merge_parts(out_parts, lse_parts, out)


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
