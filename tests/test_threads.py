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
