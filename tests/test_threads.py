"""OpenMP's wait policy whatever the import order (rrm_engine/threads.py): imported first, rrm_engine
sets OMP_WAIT_POLICY=PASSIVE before libgomp reads it; imported after torch it cannot, and the first
CPU model warns once with the fix (when torch runs more than one thread, where spinning costs).
Each case is a fresh interpreter, since the import order is per process. The effect itself is
measured by bench/omp_policy.py (bench/RESULTS.md)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cli_helpers import cli_env

CHILD = """
import sys, warnings
warnings.simplefilter("always")
first, threads, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if first == "torch":
    import torch
    import rrm_engine
else:
    import rrm_engine
    import torch
import os
torch.set_num_threads(threads)
print("policy", os.environ.get("OMP_WAIT_POLICY"))
for _ in range(2):
    if model == "-":  # the check alone (what LLM.__init__ calls for a CPU model): no model to load
        rrm_engine.threads.check_wait_policy("cpu")
    else:
        rrm_engine.LLM(model, device="cpu", kv_cache_tokens=256)
"""


def _run(first: str, threads: int, model, **env) -> subprocess.CompletedProcess:
    e = cli_env(**env)
    if "OMP_WAIT_POLICY" not in env:
        e.pop("OMP_WAIT_POLICY", None)
    e.pop("OMP_NUM_THREADS", None)
    return subprocess.run([sys.executable, "-c", CHILD, first, str(threads), str(model)], capture_output=True,
                          text=True, env=e, timeout=180)


@pytest.mark.parametrize("first,threads,env,warns,policy,build", [
    ("torch", 2, {}, True, "PASSIVE", True),  # set, but after libgomp read it: the warning says so
    ("rrm_engine", 2, {}, False, "PASSIVE", True),  # in time
    ("torch", 2, {"OMP_WAIT_POLICY": "PASSIVE"}, False, "PASSIVE", False),  # the fix the warning gives
    ("torch", 2, {"OMP_WAIT_POLICY": "ACTIVE"}, False, "ACTIVE", False),  # the user's choice wins, silently
    ("torch", 1, {}, False, "PASSIVE", False),  # one thread: nothing spins
], ids=["torch-first", "rrm-first", "torch-first-env", "user-active", "one-thread"])
def test_late_wait_policy_warns_once_with_the_fix(first, threads, env, warns, policy, build, tiny_qwen2_dir):
    out = _run(first, threads, tiny_qwen2_dir if build else "-", **env)
    assert out.returncode == 0, out.stderr
    assert f"policy {policy}" in out.stdout
    n = out.stderr.count("torch was imported before rrm_engine")
    assert n == (1 if warns else 0), out.stderr  # once, although it was checked twice
    if warns:
        assert "OMP_WAIT_POLICY=PASSIVE in the environment" in out.stderr


@pytest.mark.parametrize("env,counts", [
    ({}, (300_000, 100)),  # libgomp's default: spin, then sleep; when throttled, barely spin
    ({"OMP_WAIT_POLICY": "passive"}, (0, 0)), ({"OMP_WAIT_POLICY": "ACTIVE"}, (30_000_000_000, 1000)),
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}, (3000, 0)),  # the count wins, not when throttled
    ({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "1000"}, (1000, 1000)),  # the opt-in the docs give
    ({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300"}, (300, 300)),
    ({"GOMP_SPINCOUNT": "2k"}, (2000, 100)), ({"GOMP_SPINCOUNT": " 1M "}, (1_000_000, 100)),
    ({"GOMP_SPINCOUNT": "infinite"}, (30_000_000_000, 100)), ({"GOMP_SPINCOUNT": "0", "OMP_WAIT_POLICY": "ACTIVE"}, (0, 0)),
    ({"GOMP_SPINCOUNT": "lots", "OMP_WAIT_POLICY": "PASSIVE"}, (0, 0)),  # unparsable: libgomp ignores it
])
def test_spin_counts_as_libgomp_reads_them(env, counts):
    from rrm_engine import threads
    assert threads.openmp_spin_counts(env) == counts


TUNED_CHILD = """
import sys
import rrm_engine
from rrm_engine import threads
from rrm_kernels import cpu_ops, quant_linear_cpu
rrm_engine.LLM(sys.argv[1], device="cpu", kv_cache_tokens=256, weights="q8_0")
print("ops", cpu_ops.set_parallel_min(1, 1, 1), "quant", quant_linear_cpu.set_parallel_min(1))
pm = threads.cpu_parallel_min()
print("want", (pm.elems, pm.attention, pm.gemm), "quant", pm.quant_gemm)
"""


@pytest.mark.parametrize("policy,spin,spinning", [
    (None, None, False),  # rrm_engine's PASSIVE
    ("ACTIVE", "1000", True), ("PASSIVE", "3000", False), ("ACTIVE", "300", False), ("ACTIVE", None, True),
])
def test_engine_gives_the_ops_the_thresholds_of_the_wait_policy(policy, spin, spinning, tiny_qwen2_dir):
    from rrm_engine import threads
    env = cli_env()
    for name, value in (("OMP_WAIT_POLICY", policy), ("GOMP_SPINCOUNT", spin)):
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    out = subprocess.run([sys.executable, "-c", TUNED_CHILD, str(tiny_qwen2_dir)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    pm = threads.SPINNING_MIN if spinning else threads.PASSIVE_MIN
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["ops"] == f"{(pm.elems, pm.attention, pm.gemm)} quant {pm.quant_gemm}", out.stdout
    assert lines["want"] == lines["ops"]
