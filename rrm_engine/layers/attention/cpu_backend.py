"""Attention backend over the C++ CPU ops (rrm_kernels/cpu_ops.py, rrm_kernels/csrc/cpu_decode_ops.cpp): the
AttentionBackend protocol of rrm_engine.layers.attention, for the CPU.

Each layer is two calls: rotary on q/k fused with this step's K/V store (rope_and_store), then,
for the decode rows, paged decode attention that reads the cache pages in place and passes over
each shared prefix once for all the sequences of its group (the step's prefix levels); prefill and
extend rows (a mixed step puts them after the decode rows) use torch SDPA per sequence
(rrm_engine.layers.attention.prefill_attention: they are bound by their matmuls, not by per-op overhead). The engine also hands the decoder the ops' fused
RMSNorm + residual, silu(gate) * up, and (small_m_linear) the weight-streaming GEMM for the
projections and the LM head of steps with few rows.

`load_cpu_ops()` builds the ops on first use (about a minute, then cached); when that fails the
engine logs one line and runs the torch backend instead (LLM(attention_backend="auto") on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rrm_kernels import cpu_ops

from ...cache.kv_cache import KVCache
from .metadata import AttentionMetadata
from .torch_backend import prefill_attention
from ..rotary import Rotary
from ...threads import tune_cpu_ops


def load_cpu_ops() -> None:
    """Build (or load the cached build of) the ops; raises RuntimeError (one line) when it cannot."""
    cpu_ops.load()
    tune_cpu_ops("cpu_ops")


# Rows up to which a projection runs on the ops' weight-streaming GEMM instead of torch's BLAS
# (decode steps: one row per sequence; prefill chunks have hundreds of rows and go to the BLAS).
SMALL_M = 64


def small_m_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's linear kernel on this backend: the ops' GEMM for few rows of fp32 weights,
    torch otherwise (for bf16 torch's oneDNN path has the CPU's bf16 dot products, which the ops'
    fp32-FMA GEMM lacks: measured 337 vs 177 GFLOP/s on the avx512_bf16 EPYC)."""
    if (x.numel() <= SMALL_M * x.shape[-1] and x.dtype == weight.dtype == torch.float32
            and weight.is_contiguous()):
        return cpu_ops.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class CpuAttention:
    """The ops compute in fp32 whatever the cache stores; with a bf16/fp16 KV cache under an fp32
    model (LLM(kv_cache_dtype=...)) q and the rotary tables go in the cache's dtype (the ops take one
    storage type) and the output comes back in the model's."""

    def __init__(self) -> None:
        load_cpu_ops()  # fail here, when the backend is chosen, not in the first step
        self._tables: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _rotary_tables(self, rotary: Rotary, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if rotary.cos_table.dtype == dtype:
            return rotary.cos_table, rotary.sin_table
        key = (rotary.cos_table.data_ptr(), dtype)  # the decoder builds its tables once per device/dtype
        if key not in self._tables:
            self._tables[key] = (rotary.cos_table.to(dtype), rotary.sin_table.to(dtype))
        return self._tables[key]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary,
                 cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return self._attend(layer, q, k, v, rotary, cache, meta, scale).to(q.dtype)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary,
                cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        dtype = k_cache.dtype
        cos, sin = self._rotary_tables(rotary, dtype)
        q = cpu_ops.rope_and_store(q.to(dtype), k.to(dtype), v.to(dtype), rotary.positions, cos, sin, k_cache,
                                   v_cache, meta.slot_mapping)
        nd, b = meta.num_decode, len(meta.query_lens_host)  # a mixed step puts its decode rows first
        if nd == 0:
            return prefill_attention(layer, q, cache, meta, scale)
        dm = meta.decode_part()
        out = cpu_ops.paged_decode_attention(q[:nd], k_cache, v_cache, dm.block_tables, dm.seq_lens, scale,
                                             dm.prefix_levels)
        if nd == b:
            return out
        return torch.cat([out, prefill_attention(layer, q[nd:], cache, meta.prefill_part(), scale)])
