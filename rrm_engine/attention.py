"""The paged KV cache layout, the per-step attention metadata, and the attention backends.

Layout (shared with rrm_kernels/, which takes these tensors raw):
  k_cache, v_cache: [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
  A token's slot is block * block_size + offset; per layer, k_cache[l].view(-1, Hkv, D)[slot].
  block_tables[b, i] is the i-th block of sequence b (int32, padded with 0 past its length).

A step packs the new tokens of B sequences into T rows (varlen): sequence b owns rows
query_start_loc[b] : query_start_loc[b+1], which are the last q_len tokens of its seq_lens[b]
tokens of context. New K/V are written to slot_mapping before attention reads the cache.

Shared-prefix levels are an optional hint for the cascade decode kernel: block_tables always
hold every sequence's full table, so a backend that ignores the hint stays exact.

Mixed steps (chunked prefill + decode in one batch) put the rows with one new token first
(num_decode of them): backends run those through their decode path (split-K, cascade) and the
rest through prefill, on decode_part() / prefill_part() views of the same metadata.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .rotary import Rotary


@dataclass
class KVCache:
    k: torch.Tensor  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v: torch.Tensor

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]


class PrefixLevel:
    """One level of shared prefixes: groups of sequences whose tokens [start, start+len) are
    the same blocks. Levels are nested: level i+1 starts where level i ends.
      block_tables [G, max_blocks] int32, the blocks of each group's segment
      lens         [G] int32, tokens in each group's segment (whole blocks)
      seq_group    [B] int32, group of each sequence at this level, -1 if none
    The runner makes them from host lists (from_host): the tensors are then built on first use
    (the torch backend's), and `host` serves the Triton plan without any device transfer."""

    def __init__(self, block_tables: torch.Tensor | None, lens: torch.Tensor | None, seq_group: torch.Tensor | None,
                 host: Any = None, device: torch.device | str | None = None, pad_block: int = 0):
        self._tensors = (block_tables, lens, seq_group) if block_tables is not None else None
        self.host = host  # rrm_kernels.decode_plan.HostLevel (lists), when made from the host
        self._device, self._pad = device, pad_block

    @classmethod
    def from_host(cls, host: Any, device: torch.device | str, pad_block: int = 0) -> "PrefixLevel":
        return cls(None, None, None, host=host, device=device, pad_block=pad_block)

    def _get(self, i: int) -> torch.Tensor:
        if self._tensors is None:
            h, dev = self.host, self._device
            width = max((len(t) for t in h.block_tables), default=0)
            # pad with a block no sequence owns: masked reads past a segment never see another's KV
            tables = [t + [self._pad] * (width - len(t)) for t in h.block_tables]
            self._tensors = tuple(torch.tensor(x, dtype=torch.int32).reshape(shape).to(dev, non_blocking=True)
                                  for x, shape in ((tables, (len(tables), width)), (h.lens, (-1,)),
                                                   (h.seq_group, (-1,))))
        return self._tensors[i]

    block_tables = property(lambda self: self._get(0))
    lens = property(lambda self: self._get(1))
    seq_group = property(lambda self: self._get(2))


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_lens_host: list[int]  # the same facts on the host, so no device sync is needed
    seq_lens_host: list[int]
    prefix_levels: list[PrefixLevel] = field(default_factory=list)  # over the first num_decode rows
    # a backend's per-step launch plan of the decode rows (rrm_kernels.decode_plan.DecodePlan): set by
    # StaticDecode (static buffers a CUDA graph reads), else built by the backend on first use
    decode_plan: Any = None
    _views: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens_host)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host)

    @property
    def num_decode(self) -> int:
        """Leading rows with one new token (the runner orders them first): the decode part."""
        if "num_decode" not in self._views:
            n = 0
            for q in self.query_lens_host:
                if q != 1:
                    break
                n += 1
            self._views["num_decode"] = n
        return self._views["num_decode"]

    def decode_part(self) -> "AttentionMetadata":
        """The first num_decode rows as a pure decode step (self when the step is one); built once
        per step, so a backend may cache per-step state on it."""
        n = self.num_decode
        if n == len(self.query_lens_host):
            return self
        if "decode" not in self._views:
            self._views["decode"] = AttentionMetadata(
                self.positions[:n], self.slot_mapping[:n], self.query_start_loc[:n + 1], self.seq_lens[:n],
                self.block_tables[:n], self.query_lens_host[:n], self.seq_lens_host[:n], self.prefix_levels,
                self.decode_plan)
        return self._views["decode"]

    def prefill_part(self) -> "AttentionMetadata":
        """The rows after the decode part, their token rows rebased to start at 0."""
        n = self.num_decode
        if n == 0:
            return self
        if "prefill" not in self._views:
            t = n  # decode rows hold one token each
            self._views["prefill"] = AttentionMetadata(
                self.positions[t:], self.slot_mapping[t:], self.query_start_loc[n:] - t, self.seq_lens[n:],
                self.block_tables[n:], self.query_lens_host[n:], self.seq_lens_host[n:])
        return self._views["prefill"]


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary,
                 cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for this step's tokens, q and k before rotary; applies
        rotary, writes k/v into the cache at meta.slot_mapping, returns attention output [T, Hq, D]."""
        ...


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
