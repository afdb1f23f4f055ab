"""The tile step shared by the paged attention kernels (decode, prefill, shared-prefix pass).

Each of those kernels streams one kv head's keys in tiles of BLOCK_N tokens and folds every tile
into an fp32 online softmax over a [ROWS, D_PAD] block of queries. The two halves of that step
live here, so a change to the paged gather or to the softmax arithmetic is made once:

  k, v = load_kv_tile(...)                  gather the tile's K/V rows through a block table
  m_i, l_i, acc = online_softmax_update(...)   fold the tile into (running max, sum, output)
  m_i, l_i, acc = attend_paged_range(...)      both, over a whole key range [lo, hi) with only
                                               the length mask (decode, shared-prefix pass);
                                               prefill calls the two halves itself for its
                                               unmasked full tiles and causal diagonal tiles

Conventions (the kernels rely on them):
  - scores are in base 2: the caller passes scale_log2 = scale * log2(e), and exp2 replaces exp,
    so m_i is a base-2 running max and m_i + log2(l_i) a base-2 log-sum-exp;
  - keys outside `valid` load as zeros; a masked score must still be set to -inf by `visible`
    (with MASKED) or the zero key would get softmax weight;
  - tiles whose every score is visible skip the mask with MASKED=False (prefill's full tiles).
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of a paged attention kernel: block_m query rows per program (prefill and the
    shared-prefix pass; decode's rows are its padded query heads), block_n keys per KV tile,
    num_warps. Each kernel has a default (decode_tile, prefix_tile, prefill_tile); passing one
    overrides it, which is how `python -m bench.kernels --sweep` times the alternatives."""
    block_m: int
    block_n: int
    num_warps: int


def check_tile(tile: TileConfig) -> TileConfig:
    pow2 = lambda x: x >= 1 and x & (x - 1) == 0  # noqa: E731
    for name in ("block_m", "block_n"):
        if not (pow2(getattr(tile, name)) and getattr(tile, name) >= 16):
            raise ValueError(f"tile {name} must be a power of two >= 16 (tl.dot), got {tile}")
    if tile.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"tile num_warps must be 1, 2, 4, 8 or 16, got {tile.num_warps}")
    return tile


@triton.jit
def load_kv_tile(K, V, bt_row, offs, valid, hk, d, dmask,
                 stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                 PAGE: tl.constexpr):
    """K and V of tokens `offs` [BLOCK_N] of one sequence (or prefix group) for kv head `hk`,
    each [BLOCK_N, D_PAD]; bt_row points at that sequence's block-table row. Tokens where
    `valid` is false and head-dim lanes where `dmask` is false read as 0."""
    # a tile may span several pages: gather each token's page from the block table, widened to
    # int64 before it scales a stride so large caches cannot overflow the address arithmetic
    page = tl.load(bt_row + offs // PAGE, mask=valid, other=0).to(tl.int64)
    tok = offs % PAGE
    kv_mask = valid[:, None] & dmask[None, :]
    k = tl.load(K + page[:, None] * stride_kb + tok[:, None] * stride_kt + hk * stride_kh + d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + page[:, None] * stride_vb + tok[:, None] * stride_vt + hk * stride_vh + d[None, :],
                mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def online_softmax_update(q, k, v, visible, m_i, l_i, acc, scale_log2,
                          MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one tile into the running softmax state of the query rows.

    q [ROWS, D_PAD]; k, v [BLOCK_N, D_PAD]; m_i, l_i [ROWS] and acc [ROWS, D_PAD] fp32.
    visible: bool, broadcastable to [ROWS, BLOCK_N], which scores count (used only with MASKED).
    DOT_PRECISION: "ieee" for fp32 inputs (no silent TF32), else the tensor-core default."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * scale_log2
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # a row may see nothing of the tiles so far (prefill's diagonal tile: m = -inf); shift by 0
    # instead so its exp2 stays 0 rather than NaN. Where m_new is finite this is m_new itself.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def attend_paged_range(q, K, V, bt_row, lo, hi, hk, d, dmask, scale_log2,
                       stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                       ROWS: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Softmax state (m, l, acc) of the query rows q [ROWS, D_PAD] over keys [lo, hi) of one
    block-table row, every key visible to every row (decode and the shared-prefix pass); only the
    last tile is partial, so the length mask is the only mask."""
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < hi
        k, v = load_kv_tile(K, V, bt_row, offs, nmask, hk, d, dmask,
                            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, PAGE)
        m_i, l_i, acc = online_softmax_update(q, k, v, nmask[None, :], m_i, l_i, acc, scale_log2,
                                              True, DOT_PRECISION)
    return m_i, l_i, acc
