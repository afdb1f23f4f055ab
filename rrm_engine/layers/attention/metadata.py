"""The per-step attention metadata and the protocol every attention backend implements.

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

from ...cache.kv_cache import KVCache
from ..rotary import Rotary


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
