"""Kernel tests run on CPU through Triton's interpreter. Triton reads TRITON_INTERPRET when a
kernel is decorated (at import of a rrm_kernels/ module), so it is set here, before any test module
of this directory imports kernels."""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    _was = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _early = [m for m in sys.modules if m.startswith("rrm_kernels.")]
    if _early and _was != "1":
        raise RuntimeError(f"{_early} were imported before TRITON_INTERPRET=1 was set and no GPU is present: "
                           "set TRITON_INTERPRET=1 in the environment or in tests/conftest.py")

import pytest  # noqa: E402

# These tests build CPU tensors for the interpreter. On a GPU machine without TRITON_INTERPRET=1
# the compiled kernels would be handed CPU pointers: tests/gpu checks the kernels there instead.
_SKIP_ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.fixture(autouse=True)
def _interpreter_only():
    if _SKIP_ON_GPU:
        pytest.skip("CPU/interpreter kernel test; on a GPU run tests/gpu (or set TRITON_INTERPRET=1)")
