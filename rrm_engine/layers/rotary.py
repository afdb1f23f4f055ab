"""Rotary position embedding (half-split / rotate_half convention, as transformers' Llama/Qwen2).

A forward pass builds one Rotary: the cos/sin rows of its tokens, shared by every layer. On the
serving path it also carries the cos/sin tables [max_positions, D] and the token positions, so a
backend that fuses rotary into its KV-cache store (rrm_kernels.rope_store) reads the tables itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [..., D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., H, D]; cos/sin [..., D] (broadcast over heads)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


@dataclass
class Rotary:
    cos: torch.Tensor  # [..., D] rows of this pass's tokens
    sin: torch.Tensor
    positions: torch.Tensor | None = None  # [T]; serving path only, with the tables
    cos_table: torch.Tensor | None = None  # [max_positions, D]
    sin_table: torch.Tensor | None = None

    @classmethod
    def from_tables(cls, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor) -> "Rotary":
        # table rows are the values rotary_cos_sin computes for the same positions (same fp32 ops)
        return cls(cos_table[positions], sin_table[positions], positions, cos_table, sin_table)

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)
