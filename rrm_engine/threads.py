"""OpenMP's wait policy, whatever the import order, and the CPU ops' thread use that fits it.

OpenMP worker threads that spin while they wait for work (libgomp's default) collapse when the
cores are shared: each spinning thread holds a core the thread it waits for needs. Measured on a
2-core machine under load, with 2 threads, one compare took several times longer with the default
policy than with OMP_WAIT_POLICY=PASSIVE (bench/omp_policy.py prints the ratio; figures in
bench/RESULTS.md). libgomp reads the variable once, when torch first loads it, and offers no call
to change it afterwards (its spin count is not an exported symbol), so:

  * imported before torch, rrm_engine sets OMP_WAIT_POLICY=PASSIVE (a value the user set wins);
  * imported after torch (as TRL, verl and most training scripts do), it is too late: the first
    CPU model then warns once, with the fix, when torch runs more than one thread.

On a machine that runs nothing else, threads that spin a little are faster: every op of a decode
step can then use both cores without paying a wake-up (~50-80 us) each time. Opt in with
OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=1000 in the environment (libgomp then spins 1000 pauses,
~30 us on the EPYC VM, before it sleeps, also when it throttles; see openmp_spin_counts): the CPU
ops then go parallel from much less work (cpu_parallel_min). Spinning costs as much when other
jobs want the cores; numbers both ways: bench/RESULTS.md, "Spinning a little".
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass

# what the process looked like when rrm_engine was first imported
TORCH_WAS_IMPORTED_FIRST = "torch" in sys.modules
USER_SET_WAIT_POLICY = "OMP_WAIT_POLICY" in os.environ
_LIBGOMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# libgomp reads its variables once, when torch loads it: if that was before this import, they were
# what the user had set (rrm_engine's PASSIVE default came too late to count)
_ENV_SEEN_BY_LIBGOMP = {k: os.environ.get(k) for k in _LIBGOMP_VARS} if TORCH_WAS_IMPORTED_FIRST else None

_warned = False


def set_wait_policy() -> None:
    """Called by rrm_engine/__init__.py before anything imports torch."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def late_wait_policy_warning(num_threads: int) -> str | None:
    """The warning text when the policy could not take effect and it matters, else None."""
    if USER_SET_WAIT_POLICY or not TORCH_WAS_IMPORTED_FIRST or num_threads < 2:
        return None
    return ("rrm_engine: torch was imported before rrm_engine, so OMP_WAIT_POLICY=PASSIVE came too late for "
            f"OpenMP: its {num_threads} threads spin while they wait, which can make CPU decoding several times "
            "slower when the cores are shared. Fix: start Python with OMP_WAIT_POLICY=PASSIVE in the environment, "
            "or import rrm_engine before torch (or run torch.set_num_threads(1)).")


def check_wait_policy(device_type: str) -> None:
    """Warn once per process if a CPU model runs with spinning OpenMP threads."""
    global _warned
    if _warned or device_type != "cpu":
        return
    import torch

    text = late_wait_policy_warning(torch.get_num_threads())
    if text is not None:
        _warned = True
        warnings.warn(text, RuntimeWarning, stacklevel=3)


def _libgomp_env() -> dict:
    if _ENV_SEEN_BY_LIBGOMP is not None:
        return _ENV_SEEN_BY_LIBGOMP
    return {k: os.environ.get(k) for k in _LIBGOMP_VARS}


def openmp_spin_counts(env: dict | None = None) -> tuple[int, int]:
    """(spins, throttled spins): how many pauses libgomp's idle threads spin before they sleep, from
    the variables it read, parsed as libgomp does (GOMP_SPINCOUNT with an optional k/M/G/T suffix
    or INFINITE wins; else ACTIVE ~forever, PASSIVE 0, no policy 300000). The throttled count
    applies whenever libgomp manages more threads than there are CPUs, which is the case as soon
    as a second thread (AsyncLLM's step loop, a server's) runs parallel regions beside the main
    one on a small machine: ACTIVE 1000, no policy 100, PASSIVE 0, never above the first count."""
    if env is None:
        env = _libgomp_env()
    policy = {"ACTIVE": 1, "PASSIVE": 0}.get((env.get("OMP_WAIT_POLICY") or "").strip().upper(), -1)
    count = (env.get("GOMP_SPINCOUNT") or "").strip()
    m = re.fullmatch(r"(\d+)\s*([kKmMgGtT]?)", count)
    if count.upper() in ("INFINITE", "INFINITY"):
        spins = 30_000_000_000
    elif m:
        spins = int(m.group(1)) * 1000 ** " KMGT".index(m.group(2).upper() or " ")
    else:
        spins = {1: 30_000_000_000, 0: 0, -1: 300_000}[policy]
    return spins, min(spins, {1: 1000, 0: 0, -1: 100}[policy])


# Spins from which threads count as awake between the ops of one decode step (gaps of tens of
# microseconds at ~30 ns a pause). Both counts must reach it: the throttled one is what an engine
# stepping in its own thread gets.
SPINNING = 1000


def threads_spin() -> bool:
    return min(openmp_spin_counts()) >= SPINNING


@dataclass(frozen=True)
class ParallelMin:
    """Work from which the CPU ops use the thread pool (elements; multiply-adds)."""
    elems: int
    attention: int
    gemm: int
    quant_gemm: int


# Sleeping threads: the ops' built-in values (a wake-up costs more than a small op; measured in
# rrm_kernels/csrc/cpu/decode_kernels.h and rrm_kernels/csrc/quant_linear_cpu.cpp). Spinning threads join in a few
# microseconds, so an op goes parallel from ~10 us of one core's work.
PASSIVE_MIN = ParallelMin(elems=1 << 18, attention=1 << 24, gemm=1 << 21, quant_gemm=1 << 25)
SPINNING_MIN = ParallelMin(elems=1 << 14, attention=1 << 16, gemm=1 << 18, quant_gemm=1 << 18)


def cpu_parallel_min() -> ParallelMin:
    return SPINNING_MIN if threads_spin() else PASSIVE_MIN


def tune_cpu_ops(module: str) -> None:
    """Give a CPU op library ("cpu_ops" or "quant_linear_cpu", already loadable) the thresholds of
    cpu_parallel_min()."""
    pm = cpu_parallel_min()
    if module == "cpu_ops":
        from rrm_kernels import cpu_ops
        cpu_ops.set_parallel_min(pm.elems, pm.attention, pm.gemm)
    elif module == "quant_linear_cpu":
        from rrm_kernels import quant_linear_cpu
        quant_linear_cpu.set_parallel_min(pm.quant_gemm)
    else:
        raise ValueError(f"unknown CPU op library {module!r}")


def describe() -> str:
    """One line for benchmark headers: what libgomp does with idle threads, and the ops' thresholds."""
    env = _libgomp_env()
    spins, throttled = openmp_spin_counts(env)
    setting = ", ".join(f"{k}={env.get(k)}" for k in _LIBGOMP_VARS if env.get(k) is not None) or "libgomp defaults"
    return (f"OpenMP idle threads: {setting} (spin {spins}, throttled {throttled} pauses); CPU ops use "
            f"{'spinning' if threads_spin() else 'sleeping'}-thread thresholds")
