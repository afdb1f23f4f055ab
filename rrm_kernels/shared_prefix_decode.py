"""Shared-prefix (cascade) decode attention on the paged layout.

When many decoding sequences share a prefix (the k votes of one comparison share its prompt;
all comparisons of one query share the system prompt and the query), plain paged decode reads
that prefix's KV once per sequence per step. Here each group's prefix is read once per step for
up to block_m / g of its members (the rows of one program), and the programs of one group's
members run side by side, so their reads of the same tiles meet in L2:

  1. a prefix pass over the step's work items (DecodePlan.items: group, first member, member
     count, level), one program per (item, kv head, split): the rows of its q tile are the
     (member, head) pairs of one kv head, so each KV tile feeds up to BLOCK_M query rows;
     all levels in one launch;
  2. each sequence's suffix (tokens after the sum of its levels' lens) is a paged decode pass
     over its own block table;
  3. all parts merge exactly by log-sum-exp (rrm_kernels.paged_decode.merge_parts).

Any number of levels is supported. The engine builds a prefix tree (rrm_engine/core/runner.py): with
several queries in flight, level 0 = the system prompt shared by every row, level 1 = one query's
prompt shared by all its comparisons, level 2 = one comparison's prompt shared by its k votes.
Levels are nested: a sequence with a group at level i+1 has one at every level <= i, and level
i+1's segment starts where level i's ends; a sequence may have no group at all (then it is
plain paged decode). Group segments are whole blocks.

Everything layer-independent (who is in which group, work items, split sizes, partial buffers)
is the step's DecodePlan (rrm_kernels/decode_plan.py), built once per step and passed to every layer.
Each prefix pass is split along the prefix (split-K), so a single large group still fills the GPU.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import triton
import triton.language as tl

from .decode_plan import DecodePlan, plan_decode, prefix_tile  # noqa: F401  (prefix_tile: its old home)
from .paged_decode import (LOG2E, attend_ref, check_paged_inputs, decode_with_plan, dot_precision,
                           gather_context)
from .paged_tile import TileConfig, attend_paged_range, check_tile


@triton.jit
def _prefix_pass_kernel(
    Q, K, V, GBT, GLENS, ITEMS, MEMBERS, SPLIT_LEN, O, LSE,
    scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gbt,
    stride_op, stride_ob, stride_oh,
    stride_lp, stride_lb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    item = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    count = tl.load(ITEMS + item * 4 + 2)
    if count == 0:
        return  # an unused item of a CUDA graph's capacity
    grp = tl.load(ITEMS + item * 4)
    m0 = tl.load(ITEMS + item * 4 + 1)
    part = tl.load(ITEMS + item * 4 + 3) * tl.num_programs(2) + s  # level * splits + split
    glen = tl.load(GLENS + grp)
    split_len = tl.load(SPLIT_LEN + 1)
    lo = s * split_len
    hi = tl.minimum(lo + split_len, glen)
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < count * GROUP
    seq = tl.load(MEMBERS + m0 + rows // GROUP, mask=rmask, other=0)
    head = hk * GROUP + rows % GROUP
    if lo >= hi:  # past the group's prefix: an empty part (the buffers are reused, so say so)
        tl.store(LSE + part * stride_lp + seq * stride_lb + head, tl.full([BLOCK_M], float("-inf"), tl.float32),
                 mask=rmask)
        return
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    q = tl.load(Q + seq[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    m_i, l_i, acc = attend_paged_range(q, K, V, GBT + grp * stride_gbt, lo, hi, hk, d, dmask, scale_log2,
                                       stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                       BLOCK_M, D_PAD, PAGE, BLOCK_N, DOT_PRECISION)
    out = acc / l_i[:, None]
    lse = m_i + tl.log2(l_i)
    omask = rmask[:, None] & dmask[None, :]
    tl.store(O + part * stride_op + seq[:, None] * stride_ob + head[:, None] * stride_oh + d[None, :], out, mask=omask)
    tl.store(LSE + part * stride_lp + seq * stride_lb + head, lse, mask=rmask)


def _level_fields(level: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A PrefixLevel-like object (block_tables, lens, seq_group) or a 3-tuple in that order."""
    if isinstance(level, (tuple, list)):
        if len(level) != 3:
            raise ValueError(f"a prefix level tuple must be (block_tables, lens, seq_group), got {len(level)} items")
        return level[0], level[1], level[2]
    return level.block_tables, level.lens, level.seq_group


def _check_levels(levels: Sequence[Any], num_seqs: int, device: torch.device) -> None:
    """Shapes, dtypes and devices (no sync); values are checked on the host by plan_decode."""
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


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, plan: DecodePlan,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """One layer of a planned decode step: the prefix pass over every level (if the plan has
    any), the per-row split-K pass over each row's suffix, the merge. No checks, no allocation
    past the first layer: the engine's hot path (rrm_engine/layers/attention/triton_backend.py)."""
    out = torch.empty_like(q) if out is None else out
    if plan.has_levels:
        out_parts, lse_parts = plan.parts(q.device)
        _, page, hkv, d = k_cache.shape
        tile, gbt = plan.tile, plan.group_tables
        _prefix_pass_kernel[(plan.cap.items, hkv, plan.cap.prefix_splits)](
            q, k_cache, v_cache, gbt, plan.group_lens, plan.items, plan.members, plan.split_len,
            out_parts, lse_parts, scale * LOG2E,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            gbt.stride(0),
            out_parts.stride(0), out_parts.stride(1), out_parts.stride(2),
            lse_parts.stride(0), lse_parts.stride(1),
            GROUP=plan.group, HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), PAGE=page,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, DOT_PRECISION=dot_precision(q.dtype),
            num_warps=tile.num_warps,
        )
    return decode_with_plan(q, k_cache, v_cache, block_tables, seq_lens, scale, plan, out)


def shared_prefix_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   block_tables: torch.Tensor, seq_lens: torch.Tensor, levels: Sequence[Any],
                                   scale: float, max_seq_len: int | None = None,
                                   tile: TileConfig | None = None, plan: DecodePlan | None = None,
                                   out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D]; equal to paged_decode_attention on the same batch when the levels
    describe blocks the sequences really share. Each sequence's suffix must be non-empty or it must
    belong to a group (at least one part per sequence). tile: the prefix pass's launch shape
    instead of prefix_tile's (tuning sweeps); the suffix pass keeps decode_tile's.

    plan: the step's DecodePlan (plan_decode(..., levels=levels)), built once and reused by every
    layer; without it one is built here, which reads the levels on the host (a device sync on a
    GPU unless they carry host copies, as the engine's PrefixLevels do)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    b, hq, d = q.shape
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, b)
    _check_levels(levels, b, q.device)
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    if plan is None:
        page, hkv = k_cache.shape[1], k_cache.shape[2]
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page
        plan = plan_decode(b, hq, hkv, d, page, q.device, max_seq_len=bound, levels=levels,
                           tile=check_tile(tile) if tile is not None else None)
    return decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, plan, out)


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
