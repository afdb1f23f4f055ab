"""How the engine splits device memory: weights, activations, CUDA graphs, and the KV cache.

`gpu_memory_utilization` has vLLM's meaning: the fraction of the device's TOTAL memory this
engine may use, weights included. What else lives on the device (another process, a trainer
sharing the GPU) must fit in the rest. At start-up (llm.py) the engine
  1. loads the weights (counted from the parameters it holds),
  2. runs one profiling forward at its largest step (memory_profile.py: max_num_batched_tokens
     tokens in max_num_seqs sequences, the LM head and sampler on one row per sequence) and
     reads the activation peak from the allocator,
  3. captures the decode CUDA graphs once to measure their memory pool, and
  4. gives the KV cache what is left: min(budget, memory actually free) minus the activation
     peak and the graphs, in whole blocks (plus the one scratch block the engine keeps).
The arithmetic is `plan_kv_cache` below, a pure function of the measured numbers, so it is
tested on CPU with a fake probe. A MemoryProbe is where the numbers come from: CudaMemoryProbe
on a GPU, anything with the same five methods in tests.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch

GiB = 1 << 30


class InsufficientMemoryError(ValueError):
    """The device budget cannot hold the weights, the activations, the graphs and a minimal KV cache."""


class MemoryProbe(Protocol):
    def total(self) -> int:
        """Bytes of device memory in all."""
        ...

    def free(self) -> int:
        """Bytes this process could still allocate (other processes' use already subtracted)."""
        ...

    def allocated(self) -> int:
        """Bytes held by live tensors of this process now."""
        ...

    def peak_allocated(self) -> int:
        """Most bytes held by live tensors since reset_peak()."""
        ...

    def reset_peak(self) -> None:
        ...


class CudaMemoryProbe:
    """torch's CUDA allocator statistics and the driver's free/total counts for one device."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def total(self) -> int:
        return torch.cuda.mem_get_info(self.device)[1]

    def free(self) -> int:
        # cached but unused blocks would read as used: hand them back first (graph pools stay held)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(self.device)[0]

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak_allocated(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)


@dataclass(frozen=True)
class MemoryPlan:
    """Where the engine's memory goes (bytes). Fields a plan without a device probe cannot know
    (the CPU default) are None."""
    device: str
    how: str  # "profiled" (sized from the probe), "kv_cache_tokens" (given by the caller), "cpu default"
    total_bytes: int | None
    gpu_memory_utilization: float | None
    budget_bytes: int | None  # total * gpu_memory_utilization
    free_bytes: int | None  # free on the device when the cache was sized (weights already resident)
    weights_bytes: int
    activations_peak_bytes: int | None  # profiling forward at the largest step, LM head and sampler included
    graphs_bytes: int | None  # decode CUDA graph pools (0 when cuda_graphs is off or nothing is captured)
    kv_bytes_per_token: int
    block_size: int
    num_blocks: int  # blocks the scheduler hands out (the engine allocates one more: a scratch block)
    kv_cache_tokens: int
    kv_cache_bytes: int  # all allocated blocks, the scratch block included
    left_bytes: int | None  # budget minus everything above (negative: a given kv_cache_tokens overshoots)
    limited_by: str | None  # "budget" or "free memory" when profiled

    def as_dict(self) -> dict:
        return asdict(self)

    def shrunk_to(self, kv_cache_tokens: int) -> "MemoryPlan":
        """The same plan with a smaller cache (tensor-parallel ranks agree on the smallest)."""
        num_blocks = kv_cache_tokens // self.block_size
        kv_bytes = (num_blocks + 1) * self.block_size * self.kv_bytes_per_token
        left = None if self.left_bytes is None else self.left_bytes + self.kv_cache_bytes - kv_bytes
        return replace(self, num_blocks=num_blocks, kv_cache_tokens=num_blocks * self.block_size,
                       kv_cache_bytes=kv_bytes, left_bytes=left)

    def summary(self) -> str:
        def gib(x: int | None) -> str:
            return "?" if x is None else _gib(x)

        lines = [f"memory plan ({self.device}, {self.how}):"]
        if self.total_bytes is not None:
            lines.append(f"  budget            {gib(self.budget_bytes)} = {self.gpu_memory_utilization:g} x "
                         f"{gib(self.total_bytes)} total ({gib(self.free_bytes)} free at sizing)")
        lines += [f"  weights           {gib(self.weights_bytes)}",
                  f"  activations peak  {gib(self.activations_peak_bytes)}",
                  f"  cuda graphs       {gib(self.graphs_bytes)}",
                  f"  kv cache          {gib(self.kv_cache_bytes)}: {self.kv_cache_tokens} tokens = "
                  f"{self.num_blocks} blocks of {self.block_size} ({self.kv_bytes_per_token} B/token)"]
        if self.left_bytes is not None:
            lines.append(f"  left of budget    {gib(self.left_bytes)}"
                         + (f" (kv cache limited by {self.limited_by})" if self.limited_by else ""))
        return "\n".join(lines)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token in every layer (num_kv_heads of this rank under tensor parallelism)."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def check_utilization(gpu_memory_utilization: float) -> None:
    u = gpu_memory_utilization
    if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0.0 < u <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {u!r}")


def plan_kv_cache(*, device: str, total: int, free: int, gpu_memory_utilization: float, weights: int,
                  activations: int, graphs: int, kv_bytes_per_token: int, block_size: int, min_tokens: int,
                  kv_cache_tokens: int | None = None) -> MemoryPlan:
    """Size the KV cache from measured numbers (bytes). `free` is measured with the weights
    resident and the graphs released (they are captured again on the real cache). The cache
    must hold at least `min_tokens` (the engine's largest step); otherwise the error names how
    much memory that needs and which knob to turn. A given `kv_cache_tokens` is kept as it is
    but must fit in free memory."""
    check_utilization(gpu_memory_utilization)
    budget = int(total * gpu_memory_utilization)
    block_bytes = block_size * kv_bytes_per_token
    by_budget = budget - weights - activations - graphs
    by_free = free - activations - graphs
    room, limited_by = (by_budget, "budget") if by_budget <= by_free else (by_free, "free memory")
    if kv_cache_tokens is not None:
        num_blocks, how, limited_by = kv_cache_tokens // block_size, "kv_cache_tokens", None
        if (num_blocks + 1) * block_bytes > by_free:
            raise InsufficientMemoryError(
                f"kv_cache_tokens={kv_cache_tokens} needs {_gib((num_blocks + 1) * block_bytes)} of KV cache but "
                f"only {_gib(max(by_free, 0))} is free on {device} after the weights ({_gib(weights)}), the "
                f"activation peak ({_gib(activations)}) and the CUDA graphs ({_gib(graphs)}): lower kv_cache_tokens")
    else:
        num_blocks, how = room // block_bytes - 1, "profiled"  # -1: the engine's scratch block
        need_blocks = -(-min_tokens // block_size)
        if num_blocks < need_blocks:
            raise InsufficientMemoryError(_shortfall(device, total, free, gpu_memory_utilization, weights, activations,
                                                     graphs, (need_blocks + 1) * block_bytes, min_tokens, limited_by))
    kv_bytes = (num_blocks + 1) * block_bytes
    return MemoryPlan(device=device, how=how, total_bytes=total, gpu_memory_utilization=float(gpu_memory_utilization),
                      budget_bytes=budget, free_bytes=free, weights_bytes=weights, activations_peak_bytes=activations,
                      graphs_bytes=graphs, kv_bytes_per_token=kv_bytes_per_token, block_size=block_size,
                      num_blocks=num_blocks, kv_cache_tokens=num_blocks * block_size, kv_cache_bytes=kv_bytes,
                      left_bytes=budget - weights - activations - graphs - kv_bytes, limited_by=limited_by)


def fixed_plan(*, device: str, weights: int, kv_bytes_per_token: int, block_size: int, kv_cache_tokens: int,
               how: str) -> MemoryPlan:
    """A plan without a device probe (CPU): the cache size is a default or the caller's."""
    num_blocks = kv_cache_tokens // block_size
    return MemoryPlan(device=device, how=how, total_bytes=None, gpu_memory_utilization=None, budget_bytes=None,
                      free_bytes=None, weights_bytes=weights, activations_peak_bytes=None, graphs_bytes=None,
                      kv_bytes_per_token=kv_bytes_per_token, block_size=block_size, num_blocks=num_blocks,
                      kv_cache_tokens=num_blocks * block_size,
                      kv_cache_bytes=(num_blocks + 1) * block_size * kv_bytes_per_token, left_bytes=None,
                      limited_by=None)


def _gib(x: int) -> str:
    return f"{x / GiB:.2f} GiB" if abs(x) >= GiB else f"{x / (1 << 20):.1f} MiB"


def _shortfall(device: str, total: int, free: int, u: float, weights: int, activations: int, graphs: int,
               kv_min: int, min_tokens: int, limited_by: str) -> str:
    need = weights + activations + graphs + kv_min
    what = (f"weights {_gib(weights)} + activation peak {_gib(activations)} + CUDA graphs {_gib(graphs)} + "
            f"KV cache for {min_tokens} tokens (one full step) {_gib(kv_min)} = {_gib(need)}")
    if limited_by == "budget":
        return (f"not enough memory on {device}: the engine needs {what}, but gpu_memory_utilization={u:g} allows "
                f"{_gib(int(total * u))} of {_gib(total)}; raise gpu_memory_utilization to at least "
                f"{min(need / total + 0.005, 1.0):.2f}, or lower max_num_batched_tokens / max_num_seqs")
    return (f"not enough free memory on {device}: the engine needs {what}, but only "
            f"{_gib(free + weights)} is free for it (weights included) of {_gib(total)}; other processes or "
            f"tensors use the rest: free them, or lower max_num_batched_tokens / max_num_seqs")
