"""Attention backend over the Triton kernels in rrm_kernels/ (the AttentionBackend protocol of
rrm_engine.layers.attention): rotary on q/k fused with this step's K/V store (rope_and_store), then
decode rows through the planned decode kernels (split-K, and the shared-prefix cascade when the
step carries prefix levels) and prefill rows through paged prefill; a mixed step runs both, each
on its own rows (the runner puts the decode rows first).

The decode plan (rrm_kernels/decode_plan.py: splits, cascade work items, partial buffers) is built
once per step, on the first layer, from host lists, and reused by every layer; under CUDA graphs
StaticDecode supplies it in static buffers instead (meta.decode_plan).
"""
from __future__ import annotations

import torch

from rrm_kernels.decode_plan import DecodePlan, plan_decode
from rrm_kernels.paged_prefill import paged_prefill_attention
from rrm_kernels.rope_store import rope_and_store
from rrm_kernels.shared_prefix_decode import decode_attention

from ...cache.kv_cache import KVCache
from .metadata import AttentionMetadata
from ..rotary import Rotary


class TritonAttention:
    uses_decode_plan = True  # StaticDecode keeps its plan in static buffers for CUDA graphs

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary,
                 cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        q, _ = rope_and_store(q, k, v, rotary.positions, rotary.cos_table, rotary.sin_table, k_cache, v_cache,
                              meta.slot_mapping, return_k=False)
        q = q.to(k_cache.dtype)
        nd, b = meta.num_decode, len(meta.query_lens_host)
        if nd == 0:
            return self._prefill(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        dm = meta.decode_part()
        decode_attention(q[:nd], k_cache, v_cache, dm.block_tables, dm.seq_lens, scale,
                         self.plan(dm, q, k_cache), out=out[:nd])
        if nd < b:
            self._prefill(q[nd:], k_cache, v_cache, meta.prefill_part(), scale, out=out[nd:])
        return out

    @staticmethod
    def plan(meta: AttentionMetadata, q: torch.Tensor, k_cache: torch.Tensor) -> DecodePlan:
        """The step's decode plan: StaticDecode's, or built here on the first layer and kept on
        the (per-step) metadata for the others."""
        if meta.decode_plan is None:
            _, page, hkv, d = k_cache.shape
            meta.decode_plan = plan_decode(len(meta.seq_lens_host), q.shape[1], hkv, d, page, q.device,
                                           max_seq_len=meta.max_seq_len, seq_lens=meta.seq_lens_host,
                                           levels=meta.prefix_levels)
        return meta.decode_plan

    @staticmethod
    def _prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                                       scale, max(meta.query_lens_host), out=out)
