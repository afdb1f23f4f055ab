"""The decoder: Qwen2 / Llama / Qwen3 in one module, their differences being config fields.

Two ways in, same parameters:
  * serving: packed tokens [T] + paged KV cache + AttentionMetadata, attention via a backend;
  * training: a dense [B, L] batch (right-padded), causal SDPA with autograd, no cache.

How it serves is one explicit object, ServingSetup (attention backend, fused kernels, the LM head's
serving format, the tensor-parallel logits gather, the CPU flat forward), given at construction or
replaced as a whole with serve_with(); nothing else sets serving state on a Decoder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention import AttentionBackend, AttentionMetadata, KVCache, TorchAttention, dense_causal_attention
from .config import ModelConfig
from ..layers.fused_linear import FusedLinear, Linear, save_and_load_as_parts
from ..layers.rotary import Rotary, rotary_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # rrm_kernels.rmsnorm.rms_norm when the decoder serves with Triton kernels (no autograd there)
        self.kernel: Callable | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with residual: (norm(x + residual), x + residual), the new residual stream."""
        if self.kernel is not None and not torch.is_grad_enabled():
            return self.kernel(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        # computed in fp32 like transformers, cast back before the weight multiply
        xf = x.float()
        out = self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return out if residual is None else (out, x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        # q/k/v in one GEMM; checkpoints still hold q_proj, k_proj, v_proj (fused_linear.py)
        self.qkv_proj = FusedLinear(cfg.hidden_size, (("q_proj", hq * d), ("k_proj", hkv * d), ("v_proj", hkv * d)),
                                    bias=cfg.qkv_bias)
        save_and_load_as_parts(self)
        self.o_proj = Linear(hq * d, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.scale = d ** -0.5

    def forward(self, x: torch.Tensor, rotary: Rotary, cache: KVCache | None,
                meta: AttentionMetadata | None, backend: AttentionBackend) -> torch.Tensor:
        lead = x.shape[:-1]  # [T] when serving, [B, L] when training
        d = self.cfg.head_dim
        # -1 heads: a tensor-parallel shard holds only its own heads
        q, k, v = (t.view(*lead, -1, d) for t in self.qkv_proj.split(self.qkv_proj(x)))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if meta is None:
            o = dense_causal_attention(*rotary.apply(q, k), v, self.scale)
        else:  # the backend applies rotary: Triton fuses it with the KV-cache store
            o = backend(self.layer, q, k, v, rotary, cache, meta, self.scale)
        return self.o_proj(o.reshape(*lead, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, serving: ServingSetup | None = None):
        super().__init__()
        # gate and up in one GEMM; checkpoints still hold gate_proj, up_proj
        self.gate_up_proj = FusedLinear(cfg.hidden_size, (("gate_proj", cfg.intermediate_size),
                                                          ("up_proj", cfg.intermediate_size)), bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        save_and_load_as_parts(self)
        # silu(gate) * up in one op (rrm_kernels.cpu_ops.silu_mul) when serving on the CPU backend
        self.silu_mul: Callable | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.silu_mul is not None and not torch.is_grad_enabled():
            return self.down_proj(self.silu_mul(gate_up))
        gate, up = self.gate_up_proj.split(gate_up)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rotary: Rotary, cache: KVCache | None,
                meta: AttentionMetadata | None, backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it): the add that closes
        the layer happens in the next norm, which fuses it (rms_norm with residual)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rotary, cache, meta, backend)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


@dataclass(frozen=True)
class ServingSetup:
    """Everything that decides how a Decoder serves (never under autograd; training ignores it).
    backend: the attention backend (layers/attention/); rms_norm(x, weight, eps, residual),
    silu_mul(gate_up) and linear(x, weight, bias): fused kernels for every RMSNorm, MLP activation
    and projection (None: torch); head: the LM head in a serving weight format
    (layers/weight_formats.apply); gather_logits: turns a tensor-parallel rank's vocab slice into
    full logits; flat_forward: the CPU backend's one-loop forward (model/cpu_flat_forward.py), used
    while no forward hook is registered."""
    backend: Any = field(default_factory=TorchAttention)
    rms_norm: Callable | None = None
    silu_mul: Callable | None = None
    linear: Callable | None = None
    head: nn.Module | None = None
    gather_logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    flat_forward: Any = None

    def replace(self, **changes: Any) -> "ServingSetup":
        return dataclasses.replace(self, **changes)


class Decoder(nn.Module):
    """state_dict() names follow the Hugging Face layout (model.layers.N.self_attn.q_proj.weight ...)
    so checkpoints load and save without renaming; the fused q/k/v and gate/up parameters
    (qkv_proj, gate_up_proj) appear there as their separate parts."""

    def __init__(self, cfg: ModelConfig, serving: ServingSetup | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self._rotary_tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.serving = ServingSetup()
        self.serve_with(serving or ServingSetup())

    def serve_with(self, setup: ServingSetup) -> None:
        """Serve from now on as `setup` says (kernels are handed to every module here). To change
        one thing, pass decoder.serving.replace(thing=...)."""
        object.__setattr__(self, "serving", setup)  # not an nn.Module attribute: the head stays where weight_formats put it
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.kernel = setup.rms_norm
            elif isinstance(m, MLP):
                m.silu_mul = setup.silu_mul
            elif isinstance(m, Linear):
                m.kernel = setup.linear

    # read-only views of the setup
    @property
    def backend(self) -> AttentionBackend:
        return self.serving.backend

    @property
    def head(self) -> nn.Module | None:
        return self.serving.head

    @property
    def gather_logits(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.serving.gather_logits

    @property
    def serving_forward(self) -> Any:
        return self.serving.flat_forward

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                meta: AttentionMetadata | None = None) -> torch.Tensor:
        """Returns final hidden states (after the last norm), shaped like input_ids + [hidden]."""
        flat = self.serving_forward
        if meta is not None and flat is not None and not torch.is_grad_enabled() and not flat.hooks_registered():
            return flat(input_ids, positions, cache, meta)
        x = self.model.embed_tokens(input_ids)
        if meta is None:  # training: any positions, rows computed directly
            rotary = Rotary(*rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype))
        else:  # serving: positions < max_position_embeddings (the engine checks), tables built once
            rotary = Rotary.from_tables(positions, *self.rotary_tables(x.device, x.dtype))
        residual = None
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x, residual = torch.utils.checkpoint.checkpoint(layer, x, residual, rotary, cache, meta, self.backend,
                                                                use_reentrant=False)
            else:
                x, residual = layer(x, residual, rotary, cache, meta, self.backend)
        return self.model.norm(x, residual)[0]

    def rotary_tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [max_position_embeddings, head_dim], cached per (device, dtype)."""
        key = (device, dtype)
        if key not in self._rotary_tables:
            positions = torch.arange(self.cfg.max_position_embeddings, device=device)
            self._rotary_tables[key] = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)
        return self._rotary_tables[key]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        setup = self.serving
        if setup.head is not None:  # a serving format's own LM head (weight_formats.apply)
            logits = setup.head(hidden)
        else:
            linear = setup.linear if setup.linear is not None and not torch.is_grad_enabled() else F.linear
            logits = linear(hidden, self.lm_head_weight, None)
        return setup.gather_logits(logits) if setup.gather_logits is not None else logits
