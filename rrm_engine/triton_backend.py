"""Attention backend over the Triton kernels in kernels/ (the AttentionBackend protocol of
rrm_engine.attention): store this step's K/V, then paged decode (or the shared-prefix cascade
kernel when the step carries prefix levels) for decode steps, paged prefill otherwise.

Rotary is applied by the decoder before the backend is called, so the store here is the plain
indexed copy of attention.store_kv (kernels.rope_store.rope_and_store fuses both once the
decoder hands rotary to the backend).
"""
from __future__ import annotations

import torch

from kernels.paged_decode import paged_decode_attention
from kernels.paged_prefill import paged_prefill_attention
from kernels.shared_prefix_decode import shared_prefix_decode_attention

from .attention import AttentionMetadata, KVCache, store_kv


class TritonAttention:
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(layer, k, v, cache, meta.slot_mapping)
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        q = q.to(k_cache.dtype)
        if q.stride(-1) != 1:
            q = q.contiguous()
        if meta.is_decode:
            if meta.prefix_levels:
                return shared_prefix_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                                      meta.prefix_levels, scale, max_seq_len=meta.max_seq_len)
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                          max_seq_len=meta.max_seq_len)
        return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                                       scale, max(meta.query_lens_host))
