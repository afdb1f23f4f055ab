"""CPU decode ops in C++ (rrm_kernels/csrc/cpu_decode_ops.cpp): paged decode attention with the shared-prefix
(cascade) pass, rotary + KV store, RMSNorm + residual, silu(gate) * up, a small-M linear, and
sampling without filters (temperature or greedy).

Built from source the first time they are used on a machine (torch.utils.cpp_extension.load with
g++ and OpenMP; about a minute; cached under torch's extension dir, TORCH_EXTENSIONS_DIR, one
build per version of the sources). `load()` raises RuntimeError when the build fails; callers that
can do without (the engine's CPU backend) catch it and fall back to torch.

Each op runs AVX-512, AVX2 or plain C++ code, chosen at run time: the best this CPU supports,
unless the environment variable RRM_CPU_ISA (auto | avx512 | avx2 | scalar, read by
rrm_kernels/cpu_isa.py for both C++ libraries) or the op's `isa=` argument asks for one (tests run every path the machine has against the torch references in
rrm_kernels/paged_decode.py, shared_prefix_decode.py, rope_store.py and rmsnorm.py).
Signatures follow the Triton ops of the same names.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC_DIR / "cpu_decode_ops.cpp",)
HEADERS = (CSRC_DIR / "cpu" / "vec.h", CSRC_DIR / "cpu" / "decode_kernels.h", CSRC_DIR / "cpu" / "small_gemm.h",
           CSRC_DIR / "cpu" / "sampler.h")
from . import cpu_isa

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
ISA_ENV = cpu_isa.ISA_ENV
# keys per parallel chunk of one prefix or suffix pass: a long shared prefix still gives every
# thread work, while each chunk stays long enough to amortise its setup
SPLIT_TOKENS = 256


_module: Any = None
_failure: RuntimeError | None = None


def load() -> Any:
    """The built extension module (built on first call, then cached by torch). A failed build
    raises RuntimeError with its first line, here and on every later call (no second attempt)."""
    global _module, _failure
    if _module is None:
        if _failure is not None:
            raise _failure
        try:
            _module = _build()
        except RuntimeError as e:
            _failure = e
            raise
    return _module


def _build() -> Any:
    missing = [str(p) for p in SOURCES + HEADERS if not p.exists()]
    if missing:
        raise RuntimeError(f"CPU ops sources are missing: {', '.join(missing)}")
    from torch.utils.cpp_extension import load as jit_load
    # one build dir per version of the sources (headers included): checkouts of different versions
    # on one machine (worktrees, CI caches) never rebuild over each other's library
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:12]
    try:
        return jit_load(name=f"rrm_cpu_ops_{digest}", sources=[str(p) for p in SOURCES],
                        extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                        extra_include_paths=[str(CSRC_DIR)], verbose=False)
    except Exception as e:  # compiler missing, build error, ...: one line for the caller to log
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # the compiler's first error says more than ninja's command line
        first = next((ln for ln in lines if "error" in ln.lower() and "error building extension" not in ln.lower()),
                     lines[0] if lines else type(e).__name__)
        raise RuntimeError(f"building the CPU ops ({SOURCES[0].name}) failed: {first[:300]}") from e


def is_loaded() -> bool:
    """True once load() has succeeded in this process (callers that must not trigger a build ask this)."""
    return _module is not None


def set_parallel_min(elems: int, attention: int, gemm: int) -> tuple[int, int, int]:
    """The work from which the ops use torch's OpenMP threads: elements of an elementwise op or of
    sampling's logits, multiply-adds of decode attention and of the small-M GEMM. The built-in
    values (2^18, 2^24, 2^21) suit threads that sleep while idle (OMP_WAIT_POLICY=PASSIVE), where
    each parallel region pays a wake-up; rrm_engine.threads picks lower ones when they spin.
    Returns the values it replaces."""
    if min(elems, attention, gemm) < 1:
        raise ValueError(f"parallel minimums must be >= 1, got {elems}, {attention}, {gemm}")
    old = load().set_parallel_min(int(elems), int(attention), int(gemm))
    return int(old[0]), int(old[1]), int(old[2])


def supported_isas() -> list[str]:
    """Instruction sets this CPU can run the ops with, best first (always ends with 'scalar')."""
    return list(load().supported_isas())


def isa_code(isa: str | None = None) -> int:
    """The code an op's `isa` argument takes: the named ISA, else RRM_CPU_ISA's, else -1 (the best;
    also for "auto")."""
    name = cpu_isa.requested(isa)
    return -1 if name is None else ISAS[name]


def check_isa() -> str | None:
    """RRM_CPU_ISA against this CPU, as the built ops see it: ValueError when it forces a path the
    CPU lacks (the ops would raise on every call). Builds the ops if needed. Returns the forced ISA."""
    return cpu_isa.check_supported(supported_isas(), "cpu_ops")


def resolved_isa(isa: str | None = None, head_dim: int = 0) -> str:
    """The instruction set an op runs with (for logs and benchmarks)."""
    return load().resolved_isa(isa_code(isa), head_dim)


def level_fields(level: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(level, (tuple, list)):
        return level[0], level[1], level[2]
    return level.block_tables, level.lens, level.seq_group


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, levels: Sequence[Any] = (),
                           split_tokens: int = SPLIT_TOKENS, isa: str | None = None) -> torch.Tensor:
    """q [B, Hq, D] (one new token per sequence) -> [B, Hq, D]. With `levels` (PrefixLevel-like,
    as rrm_kernels.shared_prefix_decode) each group's prefix is read once for all its members and each
    sequence's own keys after it; without, plain paged decode. The levels must describe blocks the
    sequences really share (whole blocks, nested), as the engine's runner builds them."""
    fields = [level_fields(lv) for lv in levels]
    return load().paged_decode(q, k_cache, v_cache, block_tables, seq_lens, [f[0] for f in fields],
                               [f[1] for f in fields], [f[2] for f in fields], float(scale), int(split_tokens),
                               isa_code(isa))


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   isa: str | None = None) -> torch.Tensor:
    """Rotated q [T, Hq, D]; rotated k and v written to one layer's cache at slot_mapping
    (negative = skip). cos/sin: [max_positions, D] tables indexed by positions (int64)."""
    return load().rope_store(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, isa_code(isa))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             isa: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x); with residual: (norm(x + residual), x + residual). Same roundings as
    rrm_engine.model.decoder.RMSNorm; weight in x's dtype."""
    out = load().rms_norm(x, weight, float(eps), residual, isa_code(isa))
    return out[0] if residual is None else (out[0], out[1])


def silu_mul(gate_up: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """[..., 2I] (gate then up) -> [..., I] = silu(gate) * up."""
    return load().silu_mul(gate_up, isa_code(isa))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           isa: str | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias [N]), fp32 accumulation: the weight-streaming GEMM for
    the few rows of a decode step (see rrm_kernels/csrc/cpu/small_gemm.h; large M belongs to torch's BLAS)."""
    return load().linear(x, weight, bias, isa_code(isa))


def sample_unfiltered(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                      offsets: torch.Tensor, isa: str | None = None, return_status: bool = False):
    """rrm_kernels.sampling.sample_ref with top-k, top-p and min-p off (the caller checks that): the
    same tokens for the same (seed, offset), logprob = log_softmax(logits / T)[token] (T = 1 when
    greedy). A sampled row that holds NaN or +inf, or is entirely -inf, raises ValueError naming
    it; so does a temperature that is not finite and >= 0. With return_status=True nothing is
    raised for either: (tokens, logprobs, status), status [B] int32 1 for a bad logits row, 2 for a
    bad temperature (as rrm_kernels.sampling.sample's). A row index out of range always raises."""
    tokens, logprobs, status = load().sample(logits.float().contiguous(), row_index, temperature, seeds, offsets,
                                             isa_code(isa))
    if return_status:
        return tokens, logprobs, status
    if bool(status.any()):
        bad_t = (status == 2).nonzero().flatten().tolist()
        if bad_t:
            raise ValueError(f"temperature must be finite and >= 0, got {[temperature[b].item() for b in bad_t]} "
                             f"for samples {bad_t}")
        rows = sorted(set(row_index[status != 0].tolist()))
        raise ValueError(f"logits rows {rows} contain NaN or +inf, or are entirely -inf")
    return tokens, logprobs


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
