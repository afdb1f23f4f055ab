"""Profiling helpers: named phases (torch.profiler ranges, NVTX ranges on CUDA) and a traced run.

`phase(name)` is what the engine should wrap its step phases in (schedule / build / forward /
sample / postprocess) to make them visible in Nsight and in the Chrome trace; the engine cannot
import bench/, so today only the benchmark's calls into the public API are marked (see RESULTS.md).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A range in the torch.profiler trace, and an NVTX range when CUDA is in use (no-op otherwise)."""
    nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def profile_run(fn: Callable[[], object], out_dir: str | Path, device: torch.device, top: int = 20,
                trace_name: str = "trace_c.json") -> tuple[Path, str]:
    """Runs fn under torch.profiler; writes a Chrome/Perfetto JSON trace into out_dir and returns
    (its path, the top-ops table sorted by self time)."""
    from torch.profiler import ProfilerActivity, profile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        fn()
    path = out / trace_name
    prof.export_chrome_trace(str(path))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return path, prof.key_averages().table(sort_by=key, row_limit=top)
