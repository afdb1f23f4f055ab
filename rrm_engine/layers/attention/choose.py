"""Choosing a decoder's attention backend and the fused norm / activation / linear kernels that go
with it: torch everywhere, Triton on CUDA, the C++ ops on the CPU."""
from __future__ import annotations

import logging
from typing import Any

from .torch_backend import TorchAttention

BACKENDS = ("auto", "torch", "triton", "cpu")


def choose_backend(name: str, device: Any) -> tuple[str, dict[str, Any]]:
    """(the backend chosen, the ServingSetup fields that serve it: backend, rms_norm, silu_mul,
    linear). Torch attention and norms; the Triton kernels for both (attention with rotary fused
    into the KV store, residual add fused into RMSNorm); or the C++ CPU ops (the same fusions plus
    silu(gate) * up). "auto": Triton on CUDA, the CPU ops on CPU, torch when they are unavailable."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    torch_fields = dict(backend=TorchAttention(), rms_norm=None, silu_mul=None, linear=None)
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        try:
            from rrm_kernels.rmsnorm import rms_norm

            from .triton_backend import TritonAttention
            return "triton", dict(torch_fields, backend=TritonAttention(), rms_norm=rms_norm)
        except ImportError as e:
            if name == "triton":
                raise ValueError(f"attention_backend='triton' is not available: {e}") from e
    elif name == "cpu" or (name == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            raise ValueError(f"attention_backend='cpu' needs the model on the CPU, it is on {device}")
        from rrm_kernels import cpu_ops

        from .cpu_backend import CpuAttention, small_m_linear
        try:
            backend = CpuAttention()
        except RuntimeError as e:
            if name == "cpu":
                raise ValueError(f"attention_backend='cpu' is not available: {e}") from e
            logging.getLogger("rrm_engine").warning("CPU C++ ops unavailable, using the torch attention backend: %s", e)
            return "torch", torch_fields
        return "cpu", dict(backend=backend, rms_norm=cpu_ops.rms_norm, silu_mul=cpu_ops.silu_mul, linear=small_m_linear)
    return "torch", torch_fields
