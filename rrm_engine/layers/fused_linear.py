"""One Linear for several projections of the same input (q/k/v, gate/up): one GEMM instead of
two or three, which matters most for small decode batches where each GEMM call costs more in
overhead than in arithmetic.

The fused weight is the projections' weights stacked by rows, in `parts` order. Checkpoints keep
the separate Hugging Face tensors: state_dict() names the row slices of the fused weight as the
parts (views into it, so writing into them writes the fused weight), and load_state_dict() accepts
the parts and stacks them, once the module holding the FusedLinear has called
save_and_load_as_parts(self). A FusedLinear `qkv_proj` inside `self_attn` with parts q_proj,
k_proj, v_proj therefore saves and loads as self_attn.q_proj.weight, self_attn.k_proj.weight, ...
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear whose forward a serving backend may hand to a kernel(x, weight, bias) (e.g. the
    CPU backend's small-M GEMM); under autograd it is always F.linear."""

    kernel: Callable | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and not torch.is_grad_enabled():
            return self.kernel(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class FusedLinear(Linear):
    def __init__(self, in_features: int, parts: Sequence[tuple[str, int]], bias: bool = False,
                 device: Any = None, dtype: torch.dtype | None = None):
        """parts: (checkpoint name beside this module, output features) per projection."""
        super().__init__(in_features, sum(n for _, n in parts), bias=bias, device=device, dtype=dtype)
        self.part_names = tuple(name for name, _ in parts)
        # per-part output rows; tensor parallelism shrinks them (each rank keeps its own rows of every part)
        self.part_sizes = [int(n) for _, n in parts]

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The projections' outputs (views of y along its last dim)."""
        return y.split(self.part_sizes, dim=-1)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}={s}" for n, s in zip(self.part_names, self.part_sizes))
        return f"{super().extra_repr()}, parts=({parts})"


def save_and_load_as_parts(parent: nn.Module) -> None:
    """Make every FusedLinear child of `parent` appear in state_dict() as its separate parts and
    accept them in load_state_dict(). The hooks sit on the parent because load_state_dict hands
    each module only the keys under its own prefix, and the parts are the fused module's siblings."""
    parent.register_state_dict_post_hook(_split_state)
    parent.register_load_state_dict_pre_hook(_fuse_state)


def _fused_children(parent: nn.Module) -> list[tuple[str, FusedLinear]]:
    return [(name, m) for name, m in parent.named_children() if isinstance(m, FusedLinear)]


def _split_state(parent: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for name, fused in _fused_children(parent):
        for t in ("weight", "bias"):
            whole = state.pop(f"{prefix}{name}.{t}", None)
            if whole is None:
                continue
            for part, rows in zip(fused.part_names, whole.split(fused.part_sizes, dim=0)):
                state[f"{prefix}{part}.{t}"] = rows


def _fuse_state(parent: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    """Stack the parts into the fused tensor when all of them are there; otherwise leave the dict
    alone, so load_state_dict reports the fused name missing and the stray parts unexpected."""
    for name, fused in _fused_children(parent):
        for t in ("weight", "bias"):
            names = [f"{prefix}{part}.{t}" for part in fused.part_names]
            if f"{prefix}{name}.{t}" not in state and all(n in state for n in names):
                state[f"{prefix}{name}.{t}"] = torch.cat([state.pop(n) for n in names], dim=0)
