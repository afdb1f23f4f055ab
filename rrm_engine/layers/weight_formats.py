"""The format of the serving linears' weights, chosen at load time: LLM(..., weights=...).

  fp32  dense float32, the exact reference (and what the decoder has after loading on CPU);
  bf16  the linears' weights held in bfloat16, activations kept in the run dtype around them
        (fast where the CPU multiplies bf16 natively: avx512_bf16 / AMX);
  q8_0, q4_1
        GGUF's block formats kept as blocks and multiplied by the CPU op in
        rrm_kernels/quant_linear_cpu.py (int8 dot products, activations quantised per 32-block as
        llama.cpp does). With q4_1 the LM head is q8_0, as in GGUF files (token_embd at Q8_0).
        On a GGUF checkpoint in that format the blocks are exactly the file's own (ggml's rounding
        re-quantises its dequantised values to the same bytes: tests/test_weight_formats.py).
  auto  the fastest format that loses nothing of the checkpoint: its own block format for a
        Q8_0/Q4_1 GGUF, bf16 for a bf16 checkpoint on a CPU with native bf16, else the run dtype.
        LLM's default for a Q8_0/Q4_1 .gguf it loads itself (llm._default_weights).

Embeddings, norms and attention are untouched; a tied LM head gets its own quantised copy (the
embedding stays dense for lookups). Serving only: the quantised layers hold no parameters, so a
trainer refuses such a decoder (rrm_engine/train/trainer.py); CPU only, single process.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .fused_linear import FusedLinear
from ..threads import tune_cpu_ops

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp32", "bf16", "q8_0", "q4_1", "auto")
BLOCK_FORMATS = ("q8_0", "q4_1")
HEAD_FORMAT = {"q8_0": "q8_0", "q4_1": "q8_0"}  # the LM head keeps 8 bits, as GGUF files do


class ServingLinear(nn.Module):
    """What a converted linear keeps of the nn.Linear (or FusedLinear) it replaces: its sizes and,
    for a fused q/k/v or gate/up projection, its parts (split() as FusedLinear's)."""
    part_names: tuple[str, ...] = ()
    part_sizes: list[int] = []

    def keep_parts_of(self, linear: nn.Module) -> "ServingLinear":
        if isinstance(linear, FusedLinear):
            self.part_names, self.part_sizes = linear.part_names, list(linear.part_sizes)
        return self

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(self.part_sizes, dim=-1)


class QuantizedLinear(ServingLinear):
    """y = x @ W^T + b with W in packed GGUF blocks (no parameters: serving only)."""

    def __init__(self, packed, bias: torch.Tensor | None):
        from rrm_kernels import quant_linear_cpu as ql
        super().__init__()
        self.fmt, self.in_features, self.out_features = packed.fmt, packed.k, packed.n_out
        self.register_buffer("packed", packed.data, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)
        # resolved once: the forward calls the extension directly (~7 us of Python less per call)
        self._op, self._fmt_code = ql.load().quant_linear, ql.FORMAT_CODES[packed.fmt]
        self._isa_code = ql.ISAS.index(ql.default_isa())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> "QuantizedLinear":
        from rrm_kernels.quant_linear_cpu import PackedWeight
        return cls(PackedWeight.from_dense(weight, fmt), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or x2.stride(-1) != 1:
            x2 = x2.float().contiguous()
        y = self._op(x2, self.packed, self._fmt_code, self.out_features, self.bias, self._isa_code)
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"


class Bf16Linear(ServingLinear):
    """The weight in bfloat16; x is cast to bf16 for the matmul and the result back to x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX-BF16 (Linux /proc/cpuinfo); elsewhere False (torch then emulates bf16)."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve(weights: str, device: torch.device, checkpoint_format: str | None, dtype: torch.dtype) -> str:
    """The concrete format for weights= on this device and run dtype ('auto' decided here)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    run = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).replace("torch.", ""))
    if weights == "auto":
        if device.type != "cpu":
            return run
        if checkpoint_format in BLOCK_FORMATS:
            return checkpoint_format
        if checkpoint_format == "bf16" and run == "fp32" and cpu_has_native_bf16():
            return "bf16"
        return run
    if device.type != "cpu" and weights != run:
        raise ValueError(f"weights={weights!r} is a CPU option; on {device.type} the weights take the run dtype "
                         f"({run}): use weights='auto' or leave it unset")
    if weights == "fp32" and run != "fp32":
        raise ValueError(f"weights='fp32' needs dtype=torch.float32 (the run dtype is {run})")
    return weights


def apply(decoder: nn.Module, fmt: str) -> str:
    """Swap the decoder's linears (and LM head) to fmt in place; returns a one-line summary.
    fp32 on an fp32 decoder changes nothing. A block format whose op cannot build here falls back
    to the dense weights (rrm_kernels.quant_linear_cpu.available() logs why)."""
    if is_serving_only(decoder):
        raise ValueError(f"this decoder already serves {served_format(decoder)} weights; load the model again for {fmt}")
    if fmt in BLOCK_FORMATS:
        from rrm_kernels import quant_linear_cpu
        if not quant_linear_cpu.available():
            return f"weights {fmt} unavailable (the CPU op did not build): dense {_dtype_name(decoder)} kept"
        tune_cpu_ops("quant_linear_cpu")
        k_ok = all(m.in_features % quant_linear_cpu.QK == 0 for m in _linears(decoder))
        if not k_ok or decoder.cfg.hidden_size % quant_linear_cpu.QK:
            raise ValueError(f"weights={fmt!r} needs every linear's input size to be a multiple of "
                             f"{quant_linear_cpu.QK} (GGUF blocks)")
    if fmt == _dtype_name(decoder):
        return f"weights {fmt} (dense, as loaded)"
    dense = sum(m.weight.numel() * m.weight.element_size() for m in _linears(decoder)) + \
        decoder.lm_head_weight.numel() * decoder.lm_head_weight.element_size()
    made = 0
    for name, module in list(_named_linears(decoder)):
        new = _convert(module.weight, module.bias, fmt).keep_parts_of(module)
        made += _nbytes(new)
        parent, _, leaf = name.rpartition(".")
        setattr(decoder.get_submodule(parent), leaf, new)
    head_fmt = HEAD_FORMAT.get(fmt, fmt)
    head = _convert(decoder.lm_head_weight, None, head_fmt)
    made += _nbytes(head)
    if not decoder.cfg.tie_word_embeddings:
        decoder.lm_head = head  # the dense head's only copy is now the converted one
    decoder.serve_with(decoder.serving.replace(head=head))
    return (f"weights {fmt}" + (f" (LM head {head_fmt})" if head_fmt != fmt else "") +
            f": linears {dense / 2**20:.0f} MB dense -> {made / 2**20:.0f} MB")


def _convert(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> ServingLinear:
    if fmt in BLOCK_FORMATS:
        return QuantizedLinear.from_weight(weight, bias, fmt)
    if fmt == "bf16":
        return Bf16Linear(weight, bias)
    raise ValueError(f"no conversion of linear weights to {fmt!r}")


def _named_linears(decoder: nn.Module):
    for name, m in decoder.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            yield name, m


def _linears(decoder: nn.Module) -> list[nn.Linear]:
    return [m for _, m in _named_linears(decoder)]


def _nbytes(m: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in m.buffers()) + \
        sum(p.numel() * p.element_size() for p in m.parameters())


def _dtype_name(decoder: nn.Module) -> str:
    dt = next(decoder.parameters()).dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))


def served_weight_bytes(decoder: nn.Module) -> int:
    """Bytes of the linears and LM head as served (what a decode step reads of the weights)."""
    total = sum(_nbytes(m) for _, m in _named_linears(decoder))
    total += sum(_nbytes(m) for m in decoder.modules() if isinstance(m, ServingLinear) and m is not decoder.head)
    head = decoder.head if decoder.head is not None else None
    return total + (_nbytes(head) if head is not None else decoder.lm_head_weight.numel() * decoder.lm_head_weight.element_size())


def served_format(decoder: nn.Module) -> str:
    """The format the decoder's linears are served in now (its parameters' dtype when dense)."""
    for m in decoder.modules():
        if isinstance(m, QuantizedLinear) and m is not getattr(decoder, "head", None):
            return m.fmt
        if isinstance(m, Bf16Linear):
            return "bf16"
    return _dtype_name(decoder)


def is_serving_only(decoder: nn.Module) -> bool:
    """True when some linear holds converted (non-parameter) weights: such a decoder cannot train."""
    return any(isinstance(m, (QuantizedLinear, Bf16Linear)) for m in decoder.modules())
