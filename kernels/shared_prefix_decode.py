"""Shared-prefix (cascade) decode attention on the paged layout.

When many decoding sequences share a prefix (the k votes of one comparison share its prompt;
all comparisons of one query share the system prompt and the query), plain paged decode reads
that prefix's KV once per sequence per step. Here each group's prefix is read once:

  1. for every level and group, one pass over the group's prefix blocks computes a partial
     (out, lse) for ALL query heads of ALL member sequences: the rows of the q tile are
     (member, head) pairs of one kv head, so each KV tile feeds up to BLOCK_M query rows;
  2. each sequence's suffix (tokens after the sum of its levels' lens) is a paged decode pass
     over its own block table;
  3. all parts merge exactly by log-sum-exp (kernels.paged_decode.merge_parts).

Any number of levels is supported (the kernel is the same for each). The engine uses two:
level 0 = the query prefix shared by all comparisons of one query, level 1 = one comparison's
prompt shared by its k votes. Levels are nested: a sequence with a group at level i+1 has one
at every level <= i, and level i+1's segment starts where level i's ends; a sequence may have
no group at all (then it is plain paged decode). Group segments are whole blocks.

Each prefix pass is split along the prefix (split-K), so a single large group still fills the GPU.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import triton
import triton.language as tl

from .paged_decode import (LOG2E, attend_ref, check_paged_inputs, choose_num_splits, decode_tile, dot_precision,
                           gather_context, launch_decode_split, merge_parts, split_len_for)
from .paged_tile import TileConfig, attend_paged_range, check_tile


@triton.jit
def _prefix_pass_kernel(
    Q, K, V, GBT, GLENS, MEMBERS, MEMBER_START, O, LSE,
    scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gbt,
    stride_op, stride_ob, stride_oh,
    stride_lp, stride_lb,
    split_len,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    grp = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    glen = tl.load(GLENS + grp)
    lo = s * split_len
    hi = tl.minimum(lo + split_len, glen)
    if lo >= hi:
        return  # the parts buffer holds lse = -inf for this split already
    m0 = tl.load(MEMBER_START + grp)
    n_rows = (tl.load(MEMBER_START + grp + 1) - m0) * GROUP
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    # groups larger than one tile re-read this split's KV per row chunk, from cache
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        seq = tl.load(MEMBERS + m0 + rows // GROUP, mask=rmask, other=0)
        head = hk * GROUP + rows % GROUP
        q = tl.load(Q + seq[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        m_i, l_i, acc = attend_paged_range(q, K, V, GBT + grp * stride_gbt, lo, hi, hk, d, dmask, scale_log2,
                                           stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                           BLOCK_M, D_PAD, PAGE, BLOCK_N, DOT_PRECISION)
        out = acc / l_i[:, None]
        lse = m_i + tl.log2(l_i)
        omask = rmask[:, None] & dmask[None, :]
        tl.store(O + s * stride_op + seq[:, None] * stride_ob + head[:, None] * stride_oh + d[None, :], out, mask=omask)
        tl.store(LSE + s * stride_lp + seq * stride_lb + head, lse, mask=rmask)


def _level_fields(level: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A PrefixLevel-like object (block_tables, lens, seq_group) or a 3-tuple in that order."""
    if isinstance(level, (tuple, list)):
        if len(level) != 3:
            raise ValueError(f"a prefix level tuple must be (block_tables, lens, seq_group), got {len(level)} items")
        return level[0], level[1], level[2]
    return level.block_tables, level.lens, level.seq_group


def _check_levels(levels: Sequence[Any], num_seqs: int, page: int, device: torch.device) -> list[tuple]:
    out = []
    for i, level in enumerate(levels):
        gbt, glens, seq_group = _level_fields(level)
        if gbt.dim() != 2 or gbt.dtype != torch.int32:
            raise ValueError(f"levels[{i}].block_tables must be int32 [G, max_blocks], got {gbt.dtype} {tuple(gbt.shape)}")
        g = gbt.shape[0]
        if glens.shape != (g,) or glens.dtype != torch.int32:
            raise ValueError(f"levels[{i}].lens must be int32 [{g}], got {glens.dtype} {tuple(glens.shape)}")
        if seq_group.shape != (num_seqs,) or seq_group.dtype != torch.int32:
            raise ValueError(f"levels[{i}].seq_group must be int32 [{num_seqs}], got {seq_group.dtype} "
                             f"{tuple(seq_group.shape)}")
        if not (gbt.device == glens.device == seq_group.device == device):
            raise ValueError(f"levels[{i}] tensors must be on {device}")
        if device.type == "cpu":  # value checks are free here; on a GPU they would cost a sync per step
            if ((glens % page) != 0).any() or (glens < 0).any() or (glens > gbt.shape[1] * page).any():
                raise ValueError(f"levels[{i}].lens must be whole blocks of {page} within the group's block table, "
                                 f"got {glens.tolist()}")
            if ((seq_group < -1) | (seq_group >= g)).any():
                raise ValueError(f"levels[{i}].seq_group must be in [-1, {g}), got {seq_group.tolist()}")
        out.append((gbt, glens, seq_group))
    return out


def _members(seq_group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of each group's member sequences: members[member_start[g]:member_start[g+1]]."""
    order = torch.argsort(seq_group, stable=True)
    # slot 0 counts the -1s; scatter_add, not bincount, which syncs with the host on CUDA
    counts = torch.zeros(num_groups + 1, dtype=torch.int64, device=seq_group.device)
    counts.scatter_add_(0, (seq_group + 1).long(), torch.ones_like(seq_group, dtype=torch.int64))
    starts = torch.cumsum(counts, 0).to(torch.int32)  # starts[g] = first member of group g in order
    return order.to(torch.int32), starts


def prefix_tile(group: int, head_dim: int, page: int) -> TileConfig:
    """Rows are (member, head) pairs: 8 votes of g heads fill one block_m tile. 8 warps above
    head_dim 64: at 4, ptxas spills 184 B at the 7B shape (g=7, d=128, block_m 64) on sm_90,
    at 8 none (tests/test_csrc_build.py checks the default shapes)."""
    return TileConfig(block_m=max(16, min(64, triton.next_power_of_2(group * 8))), block_n=max(16, min(64, page)),
                      num_warps=8 if head_dim > 64 else 4)


def shared_prefix_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   block_tables: torch.Tensor, seq_lens: torch.Tensor, levels: Sequence[Any],
                                   scale: float, max_seq_len: int | None = None,
                                   tile: TileConfig | None = None) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D]; equal to paged_decode_attention on the same batch when the levels
    describe blocks the sequences really share. Each sequence's suffix must be non-empty or it must
    belong to a group (at least one part per sequence). tile: the prefix pass's launch shape
    instead of prefix_tile's (tuning sweeps); the suffix pass keeps decode_tile's."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    b, hq, d = q.shape
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, b)
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    checked = _check_levels(levels, b, page, q.device)
    out = torch.empty_like(q)
    if b == 0:
        return out
    group = hq // hkv
    tile = check_tile(tile) if tile is not None else prefix_tile(group, d, page)
    suffix_tile = decode_tile(page)

    # part layout: [prefix splits of level 0, level 1, ..., suffix splits]
    plans = []
    suffix_start = torch.zeros(b, dtype=torch.int32, device=q.device)
    for gbt, glens, seq_group in checked:
        bound = gbt.shape[1] * page
        splits = choose_num_splits(bound, gbt.shape[0], hkv)
        plans.append((splits, split_len_for(bound, splits, tile.block_n)))
        in_group = seq_group >= 0
        suffix_start += torch.where(in_group, glens[seq_group.clamp(min=0).long()], 0).to(torch.int32)
    bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page
    suffix_splits = choose_num_splits(bound, b, hkv)
    num_parts = sum(s for s, _ in plans) + suffix_splits
    out_parts = torch.empty((num_parts, b, hq, d), dtype=torch.float32, device=q.device)
    lse_parts = torch.full((num_parts, b, hq), float("-inf"), dtype=torch.float32, device=q.device)

    base = 0
    for (gbt, glens, seq_group), (splits, split_len) in zip(checked, plans):
        num_groups = gbt.shape[0]
        if num_groups:
            members, member_start = _members(seq_group, num_groups)
            _prefix_pass_kernel[(num_groups, hkv, splits)](
                q, k_cache, v_cache, gbt, glens, members, member_start,
                out_parts[base:], lse_parts[base:], scale * LOG2E,
                q.stride(0), q.stride(1),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                gbt.stride(0),
                out_parts.stride(0), out_parts.stride(1), out_parts.stride(2),
                lse_parts.stride(0), lse_parts.stride(1),
                split_len,
                GROUP=group, HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), PAGE=page,
                BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, DOT_PRECISION=dot_precision(q.dtype),
                num_warps=tile.num_warps,
            )
        base += splits
    launch_decode_split(q, k_cache, v_cache, block_tables, seq_lens, suffix_start, scale,
                        out_parts[base:], lse_parts[base:], suffix_splits,
                        split_len_for(bound, suffix_splits, suffix_tile.block_n), suffix_tile)
    return merge_parts(out_parts, lse_parts, out)


def shared_prefix_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                       block_tables: torch.Tensor, seq_lens: torch.Tensor, levels: Sequence[Any],
                                       scale: float, max_seq_len: int | None = None) -> torch.Tensor:
    """Builds each sequence's context from its groups' prefix blocks, then its own blocks after them."""
    fields = [tuple(t.cpu() for t in _level_fields(lv)) for lv in levels]
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        ks, vs, start = [], [], 0
        for gbt, glens, seq_group in fields:
            g = int(seq_group[b])
            if g < 0:
                continue
            ln = int(glens[g])
            ks.append(gather_context(k_cache, gbt[g].to(k_cache.device), 0, ln))
            vs.append(gather_context(v_cache, gbt[g].to(v_cache.device), 0, ln))
            start += ln
        ks.append(gather_context(k_cache, block_tables[b], start, n))
        vs.append(gather_context(v_cache, block_tables[b], start, n))
        out[b] = attend_ref(q[b:b + 1], torch.cat(ks), torch.cat(vs), scale)[0].to(q.dtype)
    return out
