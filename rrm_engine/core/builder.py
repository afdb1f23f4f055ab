"""Building an engine from a model and options: load (only this rank's shard under tensor
parallelism), convert the weights to the serving format, choose the attention backend, plan memory,
allocate the KV cache and capture CUDA graphs. LLM (one process) and every tensor-parallel worker
(distributed/tp_workers.py) build their engine here, so both get the same engine from the same options.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ..layers import weight_formats
from ..layers.attention.choose import choose_backend
from ..model.cpu_flat_forward import FlatForward
from ..model.loader import LoadedModel, load
from ..placement import resolve_dtype
from ..threads import check_wait_policy
from .engine import Engine
from .memory_plan import (CudaMemoryProbe, InsufficientMemoryError, MemoryPlan, MemoryProbe, check_utilization,
                          fixed_plan, kv_bytes_per_token)
from .memory_profile import capture_decode_graphs, measure_and_plan, weights_bytes

log = logging.getLogger(__name__)

_CPU_DEFAULT_KV_TOKENS = 16384  # 0.75 GB of fp32 KV for SmolLM2-135M


@dataclass
class BuiltEngine:
    engine: Engine
    loaded: LoadedModel
    memory_plan: MemoryPlan
    weights: str  # the format the linears are served in (layers/weight_formats.py)


def build_engine(model: Any = "embedded", *, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, kv_cache_tokens: int | None = None,
                 enable_prefix_caching: bool = True, block_size: int = 16, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, attention_backend: str = "auto", seed: int = 0, cuda_graphs: bool = False,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 memory_probe: MemoryProbe | None = None, sampler_backend: str = "auto", weights: str | None = None,
                 kv_cache_dtype: torch.dtype | str | None = None) -> BuiltEngine:
    """The options are LLM's (llm.py documents them). Inside a tensor-parallel group this builds this
    rank's engine; spawning the ranks is the caller's (LLM)."""
    check_options(device, attention_backend, sampler_backend, weights, kv_cache_dtype)  # before any weight is read
    if kv_cache_tokens is not None and (not isinstance(kv_cache_tokens, int) or kv_cache_tokens < block_size):
        raise ValueError(f"kv_cache_tokens must be an integer >= block_size ({block_size}), got {kv_cache_tokens!r}")
    loaded = _load_for_rank(model, device, dtype, tensor_parallel_size)  # sharded: model.cfg names the shard's heads
    decoder = loaded.model
    decoder.eval()
    check_wait_policy(next(decoder.parameters()).device.type)  # threads.py: torch imported before us
    if weights is None and isinstance(model, (str, os.PathLike)):
        weights = _default_weights(loaded, tensor_parallel_size)
    served = _apply_weights(decoder, weights, loaded, tensor_parallel_size)
    chosen, fields = choose_backend(attention_backend, next(decoder.parameters()).device)
    _check_cpu_isa(served)
    decoder.serve_with(decoder.serving.replace(**fields, flat_forward=None))  # keeps the head format and TP gather
    if chosen == "cpu":
        # serving steps run the decoder as one loop over the layers that calls the C++ ops directly
        decoder.serve_with(decoder.serving.replace(flat_forward=FlatForward(decoder)))
    kv_dtype = _kv_cache_dtype(kv_cache_dtype, next(decoder.parameters()), decoder.backend)
    plan = _plan_memory(decoder, memory_probe, gpu_memory_utilization=gpu_memory_utilization,
                        kv_cache_tokens=kv_cache_tokens, block_size=block_size,
                        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                        cuda_graphs=cuda_graphs, tensor_parallel=tensor_parallel_size != 1, kv_dtype=kv_dtype)
    engine = Engine(decoder, loaded.tokenizer, tuple(loaded.eos_token_ids), num_blocks=plan.num_blocks,
                    block_size=block_size, enable_prefix_caching=enable_prefix_caching,
                    max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, seed=seed,
                    cuda_graphs=cuda_graphs, sampler_backend=sampler_backend, kv_cache_dtype=kv_dtype)
    if cuda_graphs:
        _capture_graphs_at_init(engine)
    return BuiltEngine(engine, loaded, plan, served)


def check_options(device: str | torch.device | None, attention_backend: str, sampler_backend: str,
                  weights: str | None, kv_cache_dtype: torch.dtype | str | None) -> None:
    """Every backend and format choice, before the model is read: a bad name, or a choice this
    machine cannot run (a forced RRM_CPU_ISA the CPU lacks, Triton without a GPU or its
    interpreter, the CUDA sampler without CUDA), is one ValueError naming it now, not a failure
    after the weights have loaded or in every step. What needs the model (its device, the
    checkpoint's format) is checked where it is decided (choose_backend, weight_formats.resolve)."""
    from rrm_kernels import cpu_isa

    from ..layers.attention.choose import BACKENDS
    from .sampler import check_backend

    if attention_backend not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(map(repr, BACKENDS))}, "
                         f"got {attention_backend!r}")
    check_backend(sampler_backend)
    if weights is not None and weights not in weight_formats.WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(weight_formats.WEIGHT_FORMATS)} (or None), got {weights!r}")
    if kv_cache_dtype is not None:
        resolve_dtype(kv_cache_dtype, "cpu")
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if not cuda:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        for name, value in (("attention_backend", attention_backend), ("sampler_backend", sampler_backend)):
            if value == "triton" and not interpreted:
                raise ValueError(f"{name}='triton' needs a CUDA device (or TRITON_INTERPRET=1, Triton's slow "
                                 "interpreter on CPU tensors); use 'auto'")
        if sampler_backend == "csrc":
            raise ValueError("sampler_backend='csrc' is the CUDA greedy kernel and needs a CUDA device; use 'auto'")
    if attention_backend == "cpu" and device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"attention_backend='cpu' needs the model on the CPU, device={device!r}")
    # RRM_CPU_ISA: parsed here (an unknown value is an error even on a GPU run), and a forced path
    # checked against this CPU's flags for each C++ library the choices may use
    cpu_isa.check_cpu_supports("cpu_ops")
    if weights in weight_formats.BLOCK_FORMATS:
        cpu_isa.check_cpu_supports("quant_linear_cpu")


def _check_cpu_isa(weights: str) -> None:
    """A forced RRM_CPU_ISA against the C++ libraries this engine loaded, as they detect the CPU
    (authoritative where /proc/cpuinfo was not readable, and for weights='auto' turned into a
    block format): their ops would otherwise raise in every step."""
    from rrm_kernels import cpu_isa, cpu_ops

    if cpu_isa.requested() is None:
        return
    if cpu_ops.is_loaded():
        cpu_ops.check_isa()
    if weights in weight_formats.BLOCK_FORMATS:
        from rrm_kernels import quant_linear_cpu
        quant_linear_cpu.check_isa()


def _load_for_rank(model, device, dtype, tensor_parallel_size: int):
    """The LoadedModel this process serves: from a name or path, only this rank's shard is read
    (tensor_parallel_size > 1); a LoadedModel passed in whole is sharded in memory."""
    shard = None
    if tensor_parallel_size != 1:
        from ..distributed.tensor_parallel import rank_shard, shard_for_engine
        shard = rank_shard(tensor_parallel_size)
    if isinstance(model, (str, os.PathLike)):
        return load(model, device=device, dtype=dtype, shard=shard)
    if not (isinstance(model, LoadedModel) or hasattr(model, "model") and hasattr(model, "eos_token_ids")):
        raise TypeError(f"model must be a name, a path or a LoadedModel, got {type(model).__name__}")
    if shard is not None:
        shard_for_engine(model.model, tensor_parallel_size)
    return model


def _default_weights(loaded: LoadedModel, tensor_parallel_size: int) -> str | None:
    """weights=None for a checkpoint this engine loaded itself: the GGUF's own blocks ("auto") for a
    Q8_0/Q4_1 .gguf served by one CPU process (they lose nothing of the checkpoint), else None (the
    run dtype). Only GGUF blocks: "auto"'s bf16 for a bf16 checkpoint stays opt-in. A LoadedModel
    passed in is served as it is (a trainer's decoder keeps its parameters)."""
    on_cpu = next(loaded.model.parameters()).device.type == "cpu"
    if tensor_parallel_size == 1 and on_cpu and loaded.checkpoint_format in weight_formats.BLOCK_FORMATS:
        return "auto"
    return None


def _apply_weights(decoder, weights: str | None, loaded, tensor_parallel_size: int) -> str:
    """Convert the decoder's linears to the requested format; returns the format now served."""
    if weights is None:  # as loaded (or as an earlier LLM on the same LoadedModel converted it)
        return weight_formats.served_format(decoder)
    p = next(decoder.parameters())
    fmt = weight_formats.resolve(weights, p.device, loaded.checkpoint_format, p.dtype)
    if fmt == weight_formats.served_format(decoder):
        return fmt
    if tensor_parallel_size != 1:
        raise ValueError(f"weights={weights!r} ({fmt}) runs in one process; tensor parallelism shards dense weights")
    summary = weight_formats.apply(decoder, fmt)
    log.info("rrm_engine: %s", summary)
    return weight_formats.served_format(decoder)


def _kv_cache_dtype(spec: torch.dtype | str | None, p: torch.Tensor, backend: object = None) -> torch.dtype:
    """The KV cache's dtype: the run dtype unless asked; another one only for the CPU and torch
    attention backends on CPU (see LLM)."""
    from ..layers.attention.triton_backend import TritonAttention

    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return p.dtype
    dt = resolve_dtype(spec, p.device)
    if dt != p.dtype and (p.device.type != "cpu" or isinstance(backend, TritonAttention)):
        raise ValueError(f"kv_cache_dtype={spec!r} differs from the run dtype {p.dtype}: only a CPU engine on the cpu "
                         "or torch attention backend keeps its KV cache in another dtype (the Triton kernels read it "
                         "in the model's)")
    return dt


def _plan_memory(decoder, probe: MemoryProbe | None, *, gpu_memory_utilization: float, kv_cache_tokens: int | None,
                 block_size: int, max_num_batched_tokens: int, max_num_seqs: int, cuda_graphs: bool,
                 tensor_parallel: bool, kv_dtype: torch.dtype) -> MemoryPlan:
    """The KV cache size and where the rest of the memory goes (memory_plan.py). Without a probe
    (CPU) the cache is kv_cache_tokens or the CPU default. Tensor-parallel ranks all take the
    smallest rank's cache, or all fail together, so that their schedules stay in lockstep."""
    check_utilization(gpu_memory_utilization)
    p, cfg = next(decoder.parameters()), decoder.cfg
    if probe is None and p.device.type == "cuda":
        probe = CudaMemoryProbe(p.device)
    if probe is None:
        return fixed_plan(device=str(p.device), weights=weights_bytes(decoder),
                          kv_bytes_per_token=kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype),
                          block_size=block_size, kv_cache_tokens=kv_cache_tokens or _CPU_DEFAULT_KV_TOKENS,
                          how="kv_cache_tokens" if kv_cache_tokens else "cpu default")
    plan, error = None, None
    try:
        plan = measure_and_plan(decoder, probe, gpu_memory_utilization=gpu_memory_utilization, block_size=block_size,
                                max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                cuda_graphs=cuda_graphs, kv_cache_tokens=kv_cache_tokens)
    except InsufficientMemoryError as e:
        if not tensor_parallel:
            raise
        error = e  # the other ranks must hear of it before anyone raises
    rank = 0
    if tensor_parallel:
        import torch.distributed as dist

        from ..distributed.tensor_parallel import agree_min
        rank = dist.get_rank()
        tokens = agree_min(plan.kv_cache_tokens if plan is not None else 0, p.device)
        if error is not None:
            raise error
        if tokens == 0:
            raise InsufficientMemoryError("another tensor-parallel rank has too little memory for its KV cache "
                                          "(its own error names how much it needs)")
        plan = plan.shrunk_to(tokens)
    if rank == 0:
        print(plan.summary(), file=sys.stderr)
    return plan


def _capture_graphs_at_init(engine: Engine) -> None:
    """Capture every decode CUDA graph now, on the real KV cache, so that no capture (and no
    allocation outside the plan) happens mid-run (StaticDecode.capture_all, through the memory
    profiler's helper). Off CUDA there is nothing to capture."""
    static = engine.runner.static_decode
    if static is not None and static.capture:
        capture_decode_graphs(static)
