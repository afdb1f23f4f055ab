"""The torch attention backend: the reference every other backend is tested against, and the
training path (dense causal SDPA with autograd). Works on any device."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...cache.kv_cache import KVCache
from ..rotary import Rotary
from .metadata import AttentionMetadata, PrefixLevel


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Training path (autograd): q [B, L, Hq, D], k/v [B, L, Hkv, D], right-padded sequences."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def store_kv(layer: int, k: torch.Tensor, v: torch.Tensor, cache: KVCache, slot_mapping: torch.Tensor) -> None:
    hkv, d = k.shape[1], k.shape[2]
    cache.k[layer].view(-1, hkv, d)[slot_mapping] = k.to(cache.k.dtype)
    cache.v[layer].view(-1, hkv, d)[slot_mapping] = v.to(cache.v.dtype)


def gather_kv(layer: int, cache: KVCache, block_tables: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max_len, Hkv, D] views of each sequence's context (garbage past its length)."""
    nb = -(-max_len // cache.block_size)
    bt = block_tables[:, :nb].long()
    b = bt.shape[0]
    k = cache.k[layer][bt].reshape(b, nb * cache.block_size, *cache.k.shape[3:])[:, :max_len]
    v = cache.v[layer][bt].reshape(b, nb * cache.block_size, *cache.v.shape[3:])[:, :max_len]
    return k, v


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention that can be merged later: q [N, Hkv, M, D], k/v [N, Hkv, L, D], mask
    broadcastable to [N, Hkv, M, L] (True = attend). Returns out [N, Hkv, M, D] and the
    log-sum-exp of the scores [N, Hkv, M] in fp32; a row with nothing to attend gets lse = -inf."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num_(0.0)
    return torch.matmul(p, v.float()), lse


def merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax over the union of disjoint key sets from their partial (out, lse) pairs;
    out [..., D], lse [...]."""
    lse = torch.stack([l for _, l in parts])
    m = lse.amax(dim=0)
    w = torch.exp(lse - m)  # parts with lse = -inf weigh 0
    return sum(wi.unsqueeze(-1) * o for wi, (o, _) in zip(w, parts)) / w.sum(dim=0).unsqueeze(-1)


def prefill_attention(layer: int, q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Prefill/extend with this step's K/V already in the cache: one SDPA per sequence over its
    gathered context, causal within the new tokens. q [T, Hq, D] rotated."""
    out = torch.empty_like(q)
    start = 0
    for b, (ql, sl) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        kb, vb = gather_kv(layer, cache, meta.block_tables[b:b + 1], sl)
        qb = q[start:start + ql].transpose(0, 1).unsqueeze(0)  # [1, Hq, ql, D]
        # query i sits at position sl - ql + i and sees keys 0 .. sl - ql + i
        mask = torch.ones(ql, sl, dtype=torch.bool, device=q.device).tril(diagonal=sl - ql)
        o = F.scaled_dot_product_attention(qb, kb.transpose(1, 2).to(q.dtype), vb.transpose(1, 2).to(q.dtype),
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + ql] = o[0].transpose(0, 1)
        start += ql
    return out


class TorchAttention:
    """Reference backend in plain torch; runs anywhere. Decode is batched with a length mask, and
    when the runner names shared prefixes (meta.prefix_levels) it reads each prefix once per group
    instead of once per sequence (cascade); prefill/extend runs one SDPA per sequence. A mixed
    step's decode rows take the decode path, its other rows prefill."""

    def __init__(self) -> None:
        self._plan_cache: tuple[AttentionMetadata, _CascadePlan] | None = None

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary,
                 cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        q, k = rotary.apply(q, k)
        store_kv(layer, k, v, cache, meta.slot_mapping)
        nd, b = meta.num_decode, len(meta.query_lens_host)
        if nd == b:
            return self._decode_rows(layer, q, cache, meta, scale)
        if nd == 0:
            return self._prefill(layer, q, cache, meta, scale)
        out = torch.empty_like(q)
        out[:nd] = self._decode_rows(layer, q[:nd], cache, meta.decode_part(), scale)
        out[nd:] = self._prefill(layer, q[nd:], cache, meta.prefill_part(), scale)
        return out

    def _decode_rows(self, layer: int, q: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
        if meta.prefix_levels:
            return self._cascade_decode(layer, q, cache, meta, scale)
        return self._decode(layer, q, cache, meta, scale)

    def _prefill(self, layer: int, q: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                 scale: float) -> torch.Tensor:
        return prefill_attention(layer, q, cache, meta, scale)

    def _decode(self, layer: int, q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        kb, vb = gather_kv(layer, cache, meta.block_tables, meta.max_seq_len)
        ar = torch.arange(kb.shape[1], device=q.device)
        mask = (ar[None, :] < meta.seq_lens[:, None].to(q.device))[:, None, None, :]  # [B, 1, 1, L]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), kb.transpose(1, 2).to(q.dtype), vb.transpose(1, 2).to(q.dtype),
                                           attn_mask=mask, scale=scale, enable_gqa=True)  # [B, Hq, 1, D]
        return o[:, :, 0]

    def _cascade_decode(self, layer: int, q: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                        scale: float) -> torch.Tensor:
        """Each group's prefix is gathered once and attended by all its members' query heads in one
        matmul; each sequence's own suffix is attended separately; the parts merge by LSE."""
        b, hq, d = q.shape
        hkv = cache.k.shape[3]
        g = hq // hkv
        plan = self._plan(meta, cache.block_size, q.device)
        parts = []
        for lv in plan.levels:
            qg = q.new_zeros(lv.n_groups, lv.m_max, hq, d)
            qg[lv.group, lv.slot] = q[lv.rows]
            qg = qg.view(lv.n_groups, lv.m_max, hkv, g, d).transpose(1, 2).reshape(lv.n_groups, hkv, lv.m_max * g, d)
            kp, vp = gather_kv(layer, cache, lv.block_tables, lv.max_len)  # [G, P, Hkv, D]
            o, lse = attend_with_lse(qg, kp.transpose(1, 2), vp.transpose(1, 2), lv.mask, scale)
            o = o.view(lv.n_groups, hkv, lv.m_max, g, d).transpose(1, 2).reshape(lv.n_groups, lv.m_max, hq, d)
            lse = lse.view(lv.n_groups, hkv, lv.m_max, g).transpose(1, 2).reshape(lv.n_groups, lv.m_max, hq)
            out_l = q.new_zeros(b, hq, d, dtype=torch.float32)
            lse_l = q.new_full((b, hq), float("-inf"), dtype=torch.float32)
            out_l[lv.rows], lse_l[lv.rows] = o[lv.group, lv.slot], lse[lv.group, lv.slot]
            parts.append((out_l, lse_l))
        n = plan.suffix_tables.shape[1] * cache.block_size
        ks = cache.k[layer][plan.suffix_tables].reshape(b, n, hkv, d)
        vs = cache.v[layer][plan.suffix_tables].reshape(b, n, hkv, d)
        o, lse = attend_with_lse(q.view(b, hkv, g, d), ks.transpose(1, 2), vs.transpose(1, 2), plan.suffix_mask, scale)
        parts.append((o.reshape(b, hq, d), lse.reshape(b, hq)))
        return merge_by_lse(parts).to(q.dtype)

    def _plan(self, meta: AttentionMetadata, bs: int, device: torch.device) -> "_CascadePlan":
        """The layer-independent part of the cascade (who is in which group, where each suffix
        starts), computed on the host once per step and reused by every layer."""
        if self._plan_cache is not None and self._plan_cache[0] is meta:
            return self._plan_cache[1]
        covered = [0] * len(meta.seq_lens_host)  # tokens of each sequence covered by the levels so far
        levels = []
        for level in meta.prefix_levels:
            seq_group, lens = level.seq_group.tolist(), level.lens.tolist()
            members = [i for i, grp in enumerate(seq_group) if grp >= 0]
            if not members:
                continue
            slot, count = [], [0] * len(lens)
            for i in members:
                slot.append(count[seq_group[i]])
                count[seq_group[i]] += 1
                covered[i] += lens[seq_group[i]]
            max_len = max(lens)
            mask = torch.arange(max_len, device=device)[None, :] < level.lens.to(device)[:, None].long()
            levels.append(_LevelPlan(torch.tensor([seq_group[i] for i in members], device=device),
                                     torch.tensor(slot, device=device), torch.tensor(members, device=device),
                                     len(lens), max(count), level.block_tables, max_len, mask[:, None, None, :]))
        # the suffix of each sequence: its own blocks after the shared ones
        suffix = [n - c for n, c in zip(meta.seq_lens_host, covered)]
        nb = -(-max(suffix) // bs) + 1  # +1: a suffix need not start at offset 0 of its first block
        first = torch.tensor([c // bs for c in covered], device=device)
        idx = (first[:, None] + torch.arange(nb, device=device)[None, :]).clamp(max=meta.block_tables.shape[1] - 1)
        pos = torch.arange(nb * bs, device=device)[None, :]
        start = torch.tensor([c % bs for c in covered], device=device)[:, None]
        mask = (pos >= start) & (pos < start + torch.tensor(suffix, device=device)[:, None])
        plan = _CascadePlan(levels, meta.block_tables.gather(1, idx).long(), mask[:, None, None, :])
        self._plan_cache = (meta, plan)
        return plan


@dataclass
class _LevelPlan:
    group: torch.Tensor  # [M] group of each member sequence
    slot: torch.Tensor  # [M] its index inside the group
    rows: torch.Tensor  # [M] its row in the batch
    n_groups: int
    m_max: int  # members in the largest group
    block_tables: torch.Tensor  # [G, blocks] the level's own table
    max_len: int
    mask: torch.Tensor  # [G, 1, 1, max_len] key valid for the group


@dataclass
class _CascadePlan:
    levels: list[_LevelPlan]
    suffix_tables: torch.Tensor  # [B, nb] blocks holding each sequence's suffix
    suffix_mask: torch.Tensor  # [B, 1, 1, nb * block_size]
