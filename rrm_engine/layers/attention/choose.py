"""Choosing a decoder's attention backend (and the fused norm / activation / linear kernels that go
with it): torch everywhere, Triton on CUDA, the C++ ops on the CPU."""
from __future__ import annotations

import logging

from .torch_backend import TorchAttention


def use_backend(decoder, name: str) -> str:
    """Torch attention and norms; the Triton kernels for both (attention with rotary fused into the
    KV store, residual add fused into RMSNorm); or the C++ CPU ops (the same fusions plus
    silu(gate) * up). "auto": Triton on CUDA, the CPU ops on CPU, torch when they are unavailable.
    Returns the backend chosen: "torch", "triton" or "cpu"."""
    if name not in ("auto", "torch", "triton", "cpu"):
        raise ValueError(f"attention_backend must be 'auto', 'torch', 'triton' or 'cpu', got {name!r}")
    device = next(decoder.parameters()).device
    decoder.backend = TorchAttention()
    decoder.use_kernels()
    decoder.serving_forward = None
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        try:
            from .triton_backend import TritonAttention
            decoder.backend = TritonAttention()
            decoder.use_fused_norms(True)
            return "triton"
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
            return "torch"
        decoder.backend = backend
        decoder.use_kernels(rms_norm=cpu_ops.rms_norm, silu_mul=cpu_ops.silu_mul, linear=small_m_linear)
        return "cpu"
    return "torch"
