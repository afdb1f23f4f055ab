"""RRM_CPU_ISA: the one reading of the instruction-set choice that both C++ CPU op libraries
(rrm_kernels/cpu_ops.py, rrm_kernels/quant_linear_cpu.py) and the engine's start-up check share.

Values (case and surrounding spaces ignored): unset, "" or "auto" = the best this CPU has; "scalar",
"avx2", "avx512" = that path forced (for tests and comparisons). Anything else is a ValueError
naming the variable. A forced path the CPU lacks is refused when the LLM is built
(rrm_engine/core/builder.py check_options), not in its first step: `check_cpu_supports` reads the CPU's flags from
/proc/cpuinfo without building any C++; `check_supported` asks a built library itself.

The two libraries mean slightly different things by "avx512": the decode ops need AVX-512
F/BW/VL/DQ, the quantised linear F/BW/VL plus VNNI (its int8 dot products). REQUIRED_FLAGS holds
what each one's C++ `cpu_has` tests, in /proc/cpuinfo's spelling.
"""
from __future__ import annotations

import functools
import os

ISA_ENV = "RRM_CPU_ISA"
ISA_NAMES = ("scalar", "avx2", "avx512")  # worst to best
CHOICES = ("auto",) + ISA_NAMES

_AVX2 = ("avx2", "fma", "f16c")
REQUIRED_FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu_ops": {"scalar": (), "avx2": _AVX2,
                "avx512": _AVX2 + ("avx512f", "avx512bw", "avx512vl", "avx512dq")},
    "quant_linear_cpu": {"scalar": (), "avx2": _AVX2,
                         "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")},
}


@functools.lru_cache(maxsize=16)
def parse(value: str, source: str = ISA_ENV) -> str | None:
    """None for "the best" (unset / "" / "auto"), else the forced ISA's name. `source` names where
    the value came from, for the error (the variable, or an op's `isa` argument)."""
    if not isinstance(value, str):
        raise ValueError(f"{source} must be a string (auto, scalar, avx2 or avx512), got {value!r}")
    name = value.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in ISA_NAMES:
        raise ValueError(f"{source} must be one of auto, scalar, avx2, avx512 (or unset: the best this CPU has), "
                         f"got {value!r}")
    return name


def requested(isa: str | None = None) -> str | None:
    """The ISA asked for: the `isa` argument when given, else RRM_CPU_ISA; None = the best."""
    if isa is not None:
        return parse(isa, "isa")
    return parse(os.environ.get(ISA_ENV, ""))


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo), or None where there is no
    such file or no x86 "flags" line (then only a built library can tell)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def missing_flags(isa: str, library: str = "cpu_ops", flags: frozenset[str] | set[str] | None = None) -> list[str] | None:
    """The flags `library`'s `isa` path needs that the CPU lacks ([] = supported); None when the
    CPU's flags cannot be read. `flags` replaces /proc/cpuinfo (tests)."""
    have = cpu_flags() if flags is None else flags
    if have is None:
        return None
    return [f for f in REQUIRED_FLAGS[library][isa] if f not in have]


def check_cpu_supports(library: str = "cpu_ops", flags: frozenset[str] | set[str] | None = None) -> str | None:
    """Start-up check without building anything: RRM_CPU_ISA parses, and a forced ISA is one the
    CPU has (by its flags) for `library`. Returns the forced ISA (None = the best). Raises
    ValueError naming the variable and the missing flags."""
    isa = requested()
    if isa is None:
        return None
    missing = missing_flags(isa, library, flags)
    if missing:
        have = [name for name in reversed(ISA_NAMES) if not missing_flags(name, library, flags)]
        raise ValueError(f"{ISA_ENV}={os.environ.get(ISA_ENV)!r} forces the {isa} path of {library}, but this CPU "
                         f"lacks {', '.join(missing)}; it can run {', '.join(have)} (unset {ISA_ENV} or set it to "
                         f"auto for the best)")
    return isa


def check_supported(supported: list[str], library: str) -> str | None:
    """The same check against a built library's own answer (its `supported_isas()`, from the
    compiler's cpuid tests), which is what its ops will enforce on every call."""
    isa = requested()
    if isa is not None and isa not in supported:
        raise ValueError(f"{ISA_ENV}={os.environ.get(ISA_ENV)!r} forces the {isa} path of {library}, which this CPU "
                         f"does not support (it runs {', '.join(supported)}); unset {ISA_ENV} or set it to auto")
    return isa
