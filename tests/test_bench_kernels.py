"""`python -m bench.kernels` must not crash when a GPU session finally runs it: every case's every
implementation (the Triton ones through the interpreter here, the --sweep tiles included) runs
once on the CPU shapes and gives the same answer as the case's reference where they compute one."""
from __future__ import annotations

import os

import pytest
import torch

from bench import kernels as bk

# CPU tensors through the interpreter; a GPU session runs `python -m bench.kernels` itself
pytestmark = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter smoke test")


# the sampling cases run the sampler kernel at vocab scale through the interpreter: over 2 minutes
# of a shared CPU (measured 2026-12-01), so they run with --runslow (CI runs both)
_GROUPS = [pytest.param(g, marks=pytest.mark.slow) if g is bk.sampling_cases else g for g in bk.GROUPS]


@pytest.mark.parametrize("group", _GROUPS, ids=lambda g: g.__name__)
def test_every_impl_of_every_case_runs(group):
    setup = bk.Setup(torch.device("cpu"), torch.float32, quick=True, sweep=True)
    for case in group(setup):
        results = {impl.name: impl.fn() for impl in case.impls}
        assert results, case.name
        if group in (bk.decode_cases, bk.shared_prefix_cases, bk.prefill_cases):
            ref = results["reference"]
            for name, out in results.items():
                if name.startswith("kernel") or name.startswith("paged decode"):
                    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=f"{case.name}: {name}")


def test_sweep_adds_tiles_only_when_asked():
    plain = bk.prefill_cases(bk.Setup(torch.device("cpu"), torch.float32, quick=True))[0]
    swept = bk.prefill_cases(bk.Setup(torch.device("cpu"), torch.float32, quick=True, sweep=True))[0]
    assert not any(i.name.startswith("kernel m") for i in plain.impls)
    assert sum(i.name.startswith("kernel m") for i in swept.impls) == 8
