"""Attention backend over the Triton kernels in kernels/ (the AttentionBackend protocol of
rrm_engine.attention): rotary on q/k fused with this step's K/V store (rope_and_store), then
paged decode (or the shared-prefix cascade kernel when the step carries prefix levels) for decode
steps, paged prefill otherwise.
"""
from __future__ import annotations

import torch

from kernels.paged_decode import paged_decode_attention
from kernels.paged_prefill import paged_prefill_attention
from kernels.rope_store import rope_and_store
from kernels.shared_prefix_decode import shared_prefix_decode_attention

from .attention import AttentionMetadata, KVCache
from .rotary import Rotary


class TritonAttention:
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary,
                 cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        q, _ = rope_and_store(q, k, v, rotary.positions, rotary.cos_table, rotary.sin_table, k_cache, v_cache,
                              meta.slot_mapping, return_k=False)
        q = q.to(k_cache.dtype)
        if meta.is_decode:
            if meta.prefix_levels:
                return shared_prefix_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                                      meta.prefix_levels, scale, max_seq_len=meta.max_seq_len)
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                          max_seq_len=meta.max_seq_len)
        return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                                       scale, max(meta.query_lens_host))
