"""Paged prefill / extend attention: each sequence's new tokens (the last q_len of its context)
attend causally to its cached prefix and to themselves, read straight from the paged cache.

Varlen packing: sequence b owns q rows query_start_loc[b] : query_start_loc[b+1]; seq_lens[b]
counts its whole context including those rows. New K/V must already be in the cache.

GQA-aware: one program owns BLOCK_M rows of (new token, query head) pairs of one kv head, so
each KV tile is loaded once for all g query heads of its group. It streams KV tiles of BLOCK_N
tokens (a tile may span several pages) with an fp32 online softmax in base 2. Query token i sits
at position seq_len - q_len + i and sees keys 0 .. that position: the tiles every row sees in
full run without masks, only the tiles on the diagonal are masked, and tiles past the last
row's position are never loaded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_decode import LOG2E, check_paged_inputs, dot_precision, gather_context
from .paged_tile import TileConfig, check_tile, load_kv_tile, online_softmax_update


@triton.jit
def _prefill_kernel(
    Q, K, V, BT, QSL, SEQ_LENS, O,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_btb,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    mb = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    q_start = tl.load(QSL + b)
    q_len = tl.load(QSL + b + 1) - q_start
    if mb * BLOCK_M >= q_len * GROUP:
        return
    seq_len = tl.load(SEQ_LENS + b)
    ctx = seq_len - q_len  # tokens before the first new one

    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < q_len * GROUP
    tok_i = rows // GROUP  # new token of each row
    head = hk * GROUP + rows % GROUP
    pos = ctx + tok_i
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    q_ptrs = (q_start + tok_i)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(Q + q_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    first = ctx + (mb * BLOCK_M) // GROUP  # position of the tile's first token
    last = ctx + ((mb + 1) * BLOCK_M - 1) // GROUP
    full_end = ((first + 1) // BLOCK_N) * BLOCK_N  # keys below it are visible to every row
    hi = tl.minimum(seq_len, last + 1)
    bt_row = BT + b * stride_btb
    for n0 in range(0, full_end, BLOCK_N):  # every row sees every key of these tiles: no score mask
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < hi
        k, v = load_kv_tile(K, V, bt_row, offs, nmask, hk, d, dmask,
                            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, PAGE)
        m_i, l_i, acc = online_softmax_update(q, k, v, nmask[None, :], m_i, l_i, acc, scale_log2,
                                              False, DOT_PRECISION)
    for n0 in range(full_end, hi, BLOCK_N):  # diagonal tiles: causal and length masks
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < hi
        k, v = load_kv_tile(K, V, bt_row, offs, nmask, hk, d, dmask,
                            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, PAGE)
        visible = (offs[None, :] <= pos[:, None]) & nmask[None, :]
        m_i, l_i, acc = online_softmax_update(q, k, v, visible, m_i, l_i, acc, scale_log2,
                                              True, DOT_PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = (q_start + tok_i)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(O + o_ptrs, out.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def prefill_tile(head_dim: int, rows: int) -> TileConfig:
    """rows = max_query_len x g. ptxas at sm_90 (bf16, 64-row tiles; tests/test_csrc_build.py
    checks these defaults): with 64-key tiles 4 warps spill (392 B at d=64 g=3, 2088 B at d=128 g=7) and
    8 warps still spill 312 B at d=128; 8 warps with 32-key tiles at d=128 spill nothing. Spill-free
    is a compile fact; which spill-free shape is fastest is for `bench.kernels --sweep` on a GPU."""
    return TileConfig(block_m=64 if rows > 32 else 16, block_n=32 if head_dim > 64 else 64, num_warps=8)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            max_query_len: int, tile: TileConfig | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] (packed new tokens) -> [T, Hq, D]. Needs 1 <= q_len[b] <= seq_lens[b].
    tile: launch shape instead of prefill_tile's (tuning sweeps). out: where to write (e.g. the
    prefill rows of a mixed step's output)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got {tuple(q.shape)}")
    b = block_tables.shape[0]
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, b)
    if query_start_loc.shape != (b + 1,) or query_start_loc.dtype != torch.int32:
        raise ValueError(f"query_start_loc must be int32 [{b + 1}], got {query_start_loc.dtype} "
                         f"{tuple(query_start_loc.shape)}")
    if query_start_loc.device.type == "cpu" and b:
        q_lens = query_start_loc[1:] - query_start_loc[:-1]
        if int(query_start_loc[0]) != 0 or int(query_start_loc[-1]) != q.shape[0] or (q_lens < 0).any():
            raise ValueError(f"query_start_loc must rise from 0 to T={q.shape[0]}, got {query_start_loc.tolist()}")
        if (q_lens > seq_lens).any() or (q_lens > max_query_len).any():
            raise ValueError(f"new tokens per sequence {q_lens.tolist()} must be <= seq_lens {seq_lens.tolist()} "
                             f"and <= max_query_len {max_query_len}")
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    t, hq, d = q.shape
    out = torch.empty_like(q) if out is None else out
    if t == 0 or b == 0:
        return out
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    tile = check_tile(tile) if tile is not None else prefill_tile(d, max_query_len * group)
    grid = (triton.cdiv(max_query_len * group, tile.block_m), b, hkv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), PAGE=page,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=tile.num_warps, num_stages=2,
    )
    return out


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                                query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                max_query_len: int) -> torch.Tensor:
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    g = q.shape[1] // k_cache.shape[2]
    for b, n in enumerate(seq_lens.tolist()):
        qb = q[qsl[b]:qsl[b + 1]].float()
        ql = qb.shape[0]
        k = gather_context(k_cache, block_tables[b], 0, n).float().repeat_interleave(g, dim=1)
        v = gather_context(v_cache, block_tables[b], 0, n).float().repeat_interleave(g, dim=1)
        s = torch.einsum("mhd,nhd->hmn", qb, k) * scale
        visible = torch.ones(ql, n, dtype=torch.bool, device=q.device).tril(diagonal=n - ql)
        s = s.masked_fill(~visible, float("-inf"))
        out[qsl[b]:qsl[b + 1]] = torch.einsum("hmn,nhd->mhd", s.softmax(-1), v).to(q.dtype)
    return out
