"""OpenMP's wait policy, whatever the import order.

OpenMP worker threads that spin while they wait for work (libgomp's default) collapse when the
cores are shared: each spinning thread holds a core the thread it waits for needs. Measured on a
2-core machine under load, with 2 threads, one compare took several times longer with the default
policy than with OMP_WAIT_POLICY=PASSIVE (bench/omp_policy.py prints the ratio; figures in
bench/RESULTS.md). libgomp reads the variable once, when torch first loads it, and offers no call
to change it afterwards (its spin count is not an exported symbol), so:

  * imported before torch, rrm_engine sets OMP_WAIT_POLICY=PASSIVE (a value the user set wins);
  * imported after torch (as TRL, verl and most training scripts do), it is too late: the first
    CPU model then warns once, with the fix, when torch runs more than one thread.
"""
from __future__ import annotations

import os
import sys
import warnings

# what the process looked like when rrm_engine was first imported
TORCH_WAS_IMPORTED_FIRST = "torch" in sys.modules
USER_SET_WAIT_POLICY = "OMP_WAIT_POLICY" in os.environ

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
