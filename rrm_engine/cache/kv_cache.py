"""The paged KV cache: one tensor pair for all layers.

Layout (shared with rrm_kernels/, which takes these tensors raw):
  k_cache, v_cache: [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
  A token's slot is block * block_size + offset; per layer, k_cache[l].view(-1, Hkv, D)[slot].
  block_tables[b, i] is the i-th block of sequence b (int32, padded with 0 past its length).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
