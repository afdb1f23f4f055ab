"""Named phases for traces: a torch.profiler range, plus an NVTX range when CUDA is in use.

The engine marks its step phases (schedule / forward / sample / postprocess) with these, so they
show up in a Chrome/Perfetto trace and in Nsight. Outside a profiler a range costs about a
microsecond, nothing next to a step.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()
