"""Linear layers with GGUF-quantised weights (Q8_0, Q4_1) on the CPU: y = x @ W^T.

The weights stay in their 32-element blocks (Q8_0: fp16 scale + 32 int8, 34 B; Q4_1: fp16 scale and
min + 32 nibbles, 20 B; against 128 B in fp32) and rrm_kernels/csrc/quant_linear_cpu.cpp multiplies with them:
x is quantised per 32-block to int8 as llama.cpp does, block dot products run on int8 (AVX-512 VNNI,
AVX2 or scalar, chosen at run time), and each block's scales are applied in fp32.

Here: the quantisers (ggml's reference rounding, so re-quantising a dequantised GGUF tensor gives
back its very blocks), the packing into the kernel's column-group layout, the dequantiser, the op
with its torch reference `quant_linear_ref` (dequantise W, quantise-dequantise x, matmul), and the
JIT build (torch.utils.cpp_extension, first use only, cached by torch) with a clean fallback:
`available()` is False, with one log line saying why, when the extension cannot build.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cpu_isa

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "quant_linear_cpu.cpp"
FORMATS = ("q8_0", "q4_1")
ISAS = ("auto", "scalar", "avx2", "avx512")
QK = 32  # weights per block
GROUP = 16  # output columns per packed group (the kernel's register width in fp32 lanes)
RECORD_BYTES = {"q8_0": 544, "q4_1": 320}  # one (group, block) record: 16 columns x 32 weights
BYTES_PER_BLOCK = {"q8_0": 34, "q4_1": 20}  # GGUF's own block sizes (memory per 32 weights)
FORMAT_CODES = {"q8_0": 0, "q4_1": 1}  # the op's fmt argument


# ------------------------------------------------------------------------------ quantisers
@dataclass
class QuantizedWeight:
    """One [n_out, k] weight in blocks: q (int8 for q8_0, uint8 0..15 for q4_1) [n_out, k],
    d (and m for q4_1) float16 [n_out, k / 32]."""
    fmt: str
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


def quantize(w: torch.Tensor, fmt: str) -> QuantizedWeight:
    """ggml's reference quantisers (quantize_row_q8_0_ref / quantize_row_q4_1_ref), in fp32:
    q8_0: d = amax / 127, q = round-half-away(x / d); q4_1: d = (max - min) / 15, m = min,
    q = min(15, trunc((x - min) / d + 0.5)). The scales are stored as fp16."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if w.dim() != 2 or w.shape[1] % QK:
        raise ValueError(f"weight must be [n_out, k] with k a multiple of {QK}, got {tuple(w.shape)}")
    n, k = w.shape
    blocks = w.detach().to("cpu", torch.float32).reshape(n, k // QK, QK)
    if fmt == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        v = blocks * inv
        q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8)  # roundf: half away from zero
        return QuantizedWeight(fmt, q.reshape(n, k), d[..., 0].to(torch.float16))
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc((blocks - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
    return QuantizedWeight(fmt, q.reshape(n, k), d[..., 0].to(torch.float16), lo[..., 0].to(torch.float16))


def from_gguf_bytes(raw: torch.Tensor, fmt: str) -> QuantizedWeight:
    """A GGUF tensor's blocks (uint8 [n_out, k / 32 * bytes per block], rows as stored) as a
    QuantizedWeight. GGUF blocks: q8_0 = d fp16, 32 int8; q4_1 = d fp16, m fp16, 16 bytes whose low
    nibbles are weights 0..15 and high nibbles weights 16..31."""
    n, row_bytes = raw.shape
    kb = row_bytes // BYTES_PER_BLOCK[fmt]
    b = raw.reshape(n, kb, BYTES_PER_BLOCK[fmt]).contiguous()
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0]
    if fmt == "q8_0":
        return QuantizedWeight(fmt, b[..., 2:].contiguous().view(torch.int8).reshape(n, kb * QK), d)
    m = b[..., 2:4].contiguous().view(torch.float16)[..., 0]
    nib = b[..., 4:]
    q = torch.cat([nib & 0x0F, nib >> 4], dim=-1).reshape(n, kb * QK)
    return QuantizedWeight(fmt, q, d, m)


def to_gguf_bytes(qw: QuantizedWeight) -> torch.Tensor:
    """The inverse of from_gguf_bytes: uint8 [n_out, k / 32 * bytes per block]."""
    n, k = qw.shape
    kb = k // QK
    parts = [qw.d.reshape(n, kb, 1).contiguous().view(torch.uint8)]
    if qw.fmt == "q8_0":
        parts.append(qw.q.reshape(n, kb, QK).view(torch.uint8))
    else:
        q = qw.q.reshape(n, kb, QK)
        parts += [qw.m.reshape(n, kb, 1).contiguous().view(torch.uint8), q[..., :16] | (q[..., 16:] << 4)]
    return torch.cat(parts, dim=-1).reshape(n, -1)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """fp32 [n_out, k]: q * d (+ m), the values llama.cpp (and gguf.quants.dequantize) compute."""
    n, k = qw.shape
    q = qw.q.float().reshape(n, k // QK, QK)
    w = qw.d.float()[..., None] * q
    if qw.m is not None:
        w = w + qw.m.float()[..., None]
    return w.reshape(n, k)


# ------------------------------------------------------------------------------ packing
def pack(qw: QuantizedWeight) -> torch.Tensor:
    """The kernel's layout (rrm_kernels/csrc/quant_linear_cpu.cpp): columns padded to a multiple of 16, one
    record per (group of 16 columns, block of 32 k), group-major so a group streams along k."""
    n, k = qw.shape
    kb, groups = k // QK, -(-n // GROUP)
    pad = groups * GROUP - n

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t

    q, d = padded(qw.q), padded(qw.d)
    if qw.fmt == "q8_0":  # byte (j, n, i) = w[n, 32b + 4j + i]
        qs = q.view(torch.uint8).reshape(groups, GROUP, kb, 8, 4).permute(0, 2, 3, 1, 4).reshape(groups, kb, 512)
        parts = [qs]
    else:  # byte (j, n, i) = w[n, 32b + 4j + i] | w[n, 32b + 16 + 4j + i] << 4
        q = q.reshape(groups * GROUP, kb, QK)
        nib = (q[..., :16] | (q[..., 16:] << 4)).reshape(groups, GROUP, kb, 4, 4)
        parts = [nib.permute(0, 2, 3, 1, 4).reshape(groups, kb, 256)]
    for s in (d,) if qw.m is None else (d, padded(qw.m)):
        parts.append(s.reshape(groups, GROUP, kb).permute(0, 2, 1).contiguous().view(torch.uint8).reshape(groups, kb, 32))
    return torch.cat(parts, dim=2).reshape(-1).contiguous()


@dataclass
class PackedWeight:
    """What a quantised linear layer holds: the packed blocks and its shape."""
    fmt: str
    n_out: int
    k: int
    data: torch.Tensor  # uint8, pack()'s layout

    @classmethod
    def from_dense(cls, w: torch.Tensor, fmt: str) -> "PackedWeight":
        return cls.from_quantized(quantize(w, fmt))

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> "PackedWeight":
        n, k = qw.shape
        return cls(qw.fmt, n, k, pack(qw))

    @property
    def nbytes(self) -> int:
        return self.data.numel()


# ------------------------------------------------------------------------------ build
@functools.cache
def load():
    """Build (or reuse torch's cached build of) the extension: g++ with OpenMP, baseline x86-64
    (the AVX2 / AVX-512 kernels carry their own target attributes and are picked at run time)."""
    from torch.utils.cpp_extension import load as jit_load
    return jit_load(name="rrm_quant_linear_cpu", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)


@functools.cache
def available() -> bool:
    """True when the extension builds and loads here; otherwise logs one line saying why."""
    if os.environ.get("RRM_DISABLE_CPU_QUANT"):
        log.warning("rrm_engine: quantised CPU linears disabled by RRM_DISABLE_CPU_QUANT")
        return False
    try:
        load()
        return True
    except Exception as e:  # no compiler, no headers, a failed compile: the caller falls back
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("rrm_engine: the quantised CPU linear op (rrm_kernels/csrc/%s) did not build (%s); "
                    "falling back to dense weights", SOURCE.name, first[:300])
        return False


def supported_isas() -> list[str]:
    """The ISA paths this CPU can run (scalar always; avx2; avx512 = AVX-512 F/BW/VL + VNNI)."""
    return list(load().supported_isas())


def default_isa() -> str:
    """RRM_CPU_ISA (scalar / avx2 / avx512) forces a path, for tests and comparisons; else (unset or
    "auto") the best. Read by rrm_kernels/cpu_isa.py, as the decode ops read it."""
    return cpu_isa.requested() or "auto"


def check_isa() -> str | None:
    """RRM_CPU_ISA against this CPU as the built op sees it (avx512 here also needs VNNI):
    ValueError when it forces a path the CPU lacks. Returns the forced ISA, None for the best."""
    return cpu_isa.check_supported(supported_isas(), "quant_linear_cpu")


def set_parallel_min(macs: int) -> int:
    """Multiply-adds from which a call uses torch's OpenMP threads (built-in 2^25, for threads that
    sleep while idle; rrm_engine.threads picks a lower one when they spin). Returns the old value."""
    if macs < 1:
        raise ValueError(f"parallel minimum must be >= 1, got {macs}")
    return int(load().set_parallel_min(int(macs)))


# ------------------------------------------------------------------------------ the op
def quant_linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, isa: str | None = None) -> torch.Tensor:
    """x [..., k] (float32; other float dtypes are computed in fp32 and cast back) -> [..., n_out]."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {w.k}")
    isa = (cpu_isa.requested(isa) or "auto") if isa is not None else default_isa()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if x2.dtype != torch.float32 or x2.stride(-1) != 1:
        x2 = x2.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = load().quant_linear(x2, w.data, FORMAT_CODES[w.fmt], w.n_out, b, ISAS.index(isa))
    return y.reshape(*lead, w.n_out).to(x.dtype)


def quantize_activations_ref(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: per row and 32-block, round-half-even(x * 127 / amax) * amax / 127."""
    lead, k = x.shape[:-1], x.shape[-1]
    blocks = x.float().reshape(-1, k // QK, QK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127)).reshape(*lead, k)


def quant_linear_ref(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                     quantize_x: bool = True) -> torch.Tensor:
    """The same product in torch: dequantised W, x quantised as the kernel does (quantize_x=False:
    the exact fp32 product with the dequantised W, i.e. what the fp32 decoder computes)."""
    xf = quantize_activations_ref(x) if quantize_x else x.float()
    y = torch.nn.functional.linear(xf, dequantize(qw), None if bias is None else bias.float())
    return y.to(x.dtype)
