"""Decoder.forward for serving on the CPU backend, without the nn.Module machinery.

A decode step at a few rows is 30 layers x 9 short C++ ops (tens of microseconds each), and the
Python around them - nn.Module calls, the ops' wrappers re-reading RRM_CPU_ISA, casts and reshapes
that change nothing - took ~2.5 ms of an 18 ms step at 8 rows (Q4_1, 2 cores, 2026-12-02). This
runs the same ops in the same order on the same tensors, calling the extensions directly where the
modules would call them through their wrappers, so its hidden states are bit for bit the modules'
(tests/test_cpu_flat_forward.py). What it has no shortcut for goes through the module's own
forward or the attention backend, unchanged: bf16 linears, activations not in fp32 at a
quantised linear, a step with prefill rows, a KV cache in another dtype than the activations.

It holds the modules' tensors as they are when it is built: updates in place (optimizer steps,
load_state_dict) show through; replacing a module or a parameter object needs the backend chosen
again (a new LLM on the decoder). Built by rrm_engine.llm when the CPU backend serves a decoder
(after its weights are converted); Decoder.forward hands it the serving calls made without
autograd, unless a forward hook is registered anywhere in the decoder (or globally): hooks run
only on the modules' path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from torch.nn.modules import module as torch_module

from rrm_kernels import cpu_ops

from ..layers.attention import AttentionMetadata, KVCache
from ..layers.attention.cpu_backend import SMALL_M, small_m_linear
from ..layers.rotary import Rotary
from ..layers.weight_formats import QuantizedLinear

# a projection of [T, K] rows, given the ops' resolved instruction set
Projection = Callable[[torch.Tensor, int], torch.Tensor]


def _projection(m: torch.nn.Module) -> Projection:
    """m(x) for x [T, K], calling the extension directly where m's forward would."""
    if isinstance(m, QuantizedLinear):
        op, packed, fmt, n_out, bias, isa_code = m._op, m.packed, m._fmt_code, m.out_features, m.bias, m._isa_code

        def quantised(x: torch.Tensor, isa: int) -> torch.Tensor:
            if x.dtype != torch.float32 or x.stride(-1) != 1:
                return m.forward(x)
            return op(x, packed, fmt, n_out, bias, isa_code)
        return quantised
    if getattr(m, "kernel", None) is small_m_linear:
        weight, bias = m.weight, m.bias

        def dense(x: torch.Tensor, isa: int) -> torch.Tensor:
            if x.shape[0] <= SMALL_M and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous():
                return cpu_ops.load().linear(x, weight, bias, isa)
            return F.linear(x, weight, bias)
        return dense
    forward = m.forward
    return lambda x, isa: forward(x)


@dataclass
class _Layer:
    norm1: torch.Tensor
    eps1: float
    qkv: Projection
    qkv_sizes: list[int]
    q_norm: Callable | None  # Qwen3's per-head norms (module forwards), else None
    k_norm: Callable | None
    o: Projection
    scale: float
    norm2: torch.Tensor
    eps2: float
    gate_up: Projection
    down: Projection


class FlatForward:
    """decoder(input_ids, positions, cache, meta) for serving steps, as one loop over the layers."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.layers = []
        for layer in decoder.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            if mlp.silu_mul is None or layer.input_layernorm.kernel is None:
                raise ValueError("FlatForward serves a decoder set up for the CPU backend (a ServingSetup with the CPU ops' kernels)")
            self.layers.append(_Layer(
                layer.input_layernorm.weight, layer.input_layernorm.eps, _projection(a.qkv_proj),
                list(a.qkv_proj.part_sizes), a.q_norm.forward if a.cfg.qk_norm else None,
                a.k_norm.forward if a.cfg.qk_norm else None, _projection(a.o_proj), a.scale,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps,
                _projection(mlp.gate_up_proj), _projection(mlp.down_proj)))
        self.final_norm = decoder.model.norm
        self._modules = list(decoder.modules())

    def hooks_registered(self) -> bool:
        """A forward (pre-)hook on any of the decoder's modules or a global one (~20 us for the
        embedded model's 275 modules): the caller then runs the modules, so that hooks fire."""
        if getattr(torch_module, "_global_forward_hooks", None) or getattr(torch_module, "_global_forward_pre_hooks", None):
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._modules)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 meta: AttentionMetadata) -> torch.Tensor:
        d = self.decoder
        ops = cpu_ops.load()
        isa = cpu_ops.isa_code()  # RRM_CPU_ISA, read once a step instead of once an op
        x = d.model.embed_tokens.forward(input_ids)  # a module: tensor parallelism's all-reduces its shards
        rotary = Rotary.from_tables(positions, *d.rotary_tables(x.device, x.dtype))
        head_dim = d.cfg.head_dim
        # a pure decode step with the cache in the activations' dtype: rotary + store and the cascade
        # attention called directly (CpuAttention's own path, without its casts); anything else: the backend
        direct = meta.num_decode == len(meta.query_lens_host) and cache.k.dtype == x.dtype
        if direct:
            levels = [cpu_ops.level_fields(lv) for lv in meta.prefix_levels]
            lv_tables, lv_lens, lv_groups = [f[0] for f in levels], [f[1] for f in levels], [f[2] for f in levels]
        t = x.shape[0]
        residual = None
        for i, L in enumerate(self.layers):
            if residual is None:
                residual, h = x, ops.rms_norm(x, L.norm1, float(L.eps1), None, isa)[0]
            else:
                h, residual = ops.rms_norm(x, L.norm1, float(L.eps1), residual, isa)
            q, k, v = (p.view(t, -1, head_dim) for p in L.qkv(h, isa).split(L.qkv_sizes, dim=-1))
            if L.q_norm is not None:
                q, k = L.q_norm(q), L.k_norm(k)
            if direct:
                kc, vc = cache.k[i], cache.v[i]
                q = ops.rope_store(q, k, v, positions, rotary.cos_table, rotary.sin_table, kc, vc, meta.slot_mapping, isa)
                o = ops.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens, lv_tables, lv_lens, lv_groups,
                                     float(L.scale), cpu_ops.SPLIT_TOKENS, isa)
            else:
                o = d.backend(i, q, k, v, rotary, cache, meta, L.scale)
            h, residual = ops.rms_norm(L.o(o.reshape(t, -1), isa), L.norm2, float(L.eps2), residual, isa)
            x = L.down(ops.silu_mul(L.gate_up(h, isa), isa), isa)
        return ops.rms_norm(x, self.final_norm.weight, float(self.final_norm.eps), residual, isa)[0]
