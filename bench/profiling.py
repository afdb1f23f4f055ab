"""Profiling helpers: a traced run of the engine. Named phases come from rrm_engine.core.profiling
(the engine marks engine.schedule / engine.forward / engine.sample itself)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def profile_run(fn: Callable[[Callable[[], None]], object], out_dir: str | Path, device: torch.device,
                steps: int = 10, top: int = 20, trace_name: str = "trace_c.json") -> tuple[Path, str]:
    """Runs fn(tick) under torch.profiler, recording the `steps` engine steps after the first (fn
    calls tick() after every engine step; a whole run is ~20K ops per step, too many to keep).
    Writes a Chrome/Perfetto JSON trace into out_dir; returns (its path, the top-ops table)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / trace_name
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables: list[str] = []
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def ready(p) -> None:
        p.export_chrome_trace(str(path))
        tables.append(p.key_averages().table(sort_by=key, row_limit=top))

    with profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                 on_trace_ready=ready) as prof:
        fn(prof.step)
    if not tables:  # the run had fewer steps than the window: flush what was recorded
        return path, "(the run ended before the profiling window; lower --profile-steps)"
    return path, tables[0]
