"""The measurements behind the memory plan (memory_plan.py): one forward at the engine's largest
step, and the memory of the decode CUDA graphs.

Both run before the real KV cache exists, on a provisional cache just large enough for them; the
numbers are differences of the probe's readings, so the provisional cache itself is not counted.

The profiling step is the worst the scheduler can build: max_num_batched_tokens new tokens in
min(max_num_seqs, tokens) fresh sequences, each sampling from its last token (the LM head on
that many rows, then the sampler with top-k and top-p). Every sequence points at the same
provisional blocks: their K/V writes collide, which is harmless since only memory is measured.
Fresh prompts only: a chunk that extends a long cached context reads it through the paged
kernels without more activation memory on the Triton backend (the torch reference backend does
gather it; that backend is for CPU).
"""
from __future__ import annotations

import torch

from ..layers.attention import AttentionMetadata, KVCache
from .cuda_graphs import StaticDecode
from .memory_plan import MemoryPlan, MemoryProbe, check_utilization, kv_bytes_per_token, plan_kv_cache
from ..model.decoder import Decoder
from .sampler import SampleRequest, sample
from ..sampling_params import SamplingParams


def provisional_cache(model: Decoder, num_blocks: int, block_size: int) -> KVCache:
    p = next(model.parameters())
    cfg = model.cfg  # a tensor-parallel shard's cfg names its own KV heads
    return KVCache.allocate(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, p.dtype, p.device)


def profile_step_shape(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """Prompt lengths of the profiling step: the token budget spread evenly over as many
    sequences as the scheduler may run (each shorter than the model's context)."""
    seqs = min(max_num_seqs, max_num_batched_tokens)
    tokens = min(max_num_batched_tokens, seqs * (max_model_len - 1))
    return [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]


@torch.inference_mode()
def profile_activations(model: Decoder, probe: MemoryProbe, *, max_num_batched_tokens: int, max_num_seqs: int,
                        block_size: int) -> int:
    """Peak bytes the largest step allocates on top of the weights and the cache."""
    lens = profile_step_shape(max_num_batched_tokens, max_num_seqs, model.cfg.max_position_embeddings)
    blocks = -(-max(lens) // block_size)
    cache = provisional_cache(model, blocks, block_size)
    dev = cache.k.device
    positions = torch.cat([torch.arange(n, device=dev) for n in lens])
    qsl = torch.zeros(len(lens) + 1, dtype=torch.int32, device=dev)
    torch.cumsum(torch.tensor(lens, device=dev), 0, out=qsl[1:])
    meta = AttentionMetadata(positions=positions, slot_mapping=positions.clone(), query_start_loc=qsl,
                             seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
                             block_tables=torch.arange(blocks, dtype=torch.int32, device=dev).expand(len(lens), -1).contiguous(),
                             query_lens_host=list(lens), seq_lens_host=list(lens))
    input_ids = torch.zeros(len(positions), dtype=torch.int64, device=dev)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    wants = [SampleRequest(i, params, i, 0) for i in range(len(lens))]
    probe.reset_peak()
    base = probe.allocated()
    hidden = model(input_ids, positions, cache, meta)
    logits = model.compute_logits(hidden[qsl[1:].long() - 1]).float()  # as the runner hands them to the sampler
    sample(logits, wants)
    peak = probe.peak_allocated()
    del hidden, logits, cache
    return max(0, peak - base)


def capture_decode_graphs(static: StaticDecode) -> None:
    """Capture the decode graph of every padded batch size (StaticDecode.capture_all: padding
    rows that decode one token in the scratch block, so nothing outside it is written; the
    static plan buffers the graphs read are allocated here too, so they are measured). A no-op
    off CUDA."""
    static.capture_all()


def measure_decode_graphs(model: Decoder, probe: MemoryProbe, *, max_num_seqs: int, block_size: int) -> int:
    """Bytes the decode CUDA graphs hold once captured (their private pools, static buffers and
    outputs), measured on a one-block provisional cache and released afterwards: the engine
    captures them again on its real cache. 0 off CUDA, where nothing is captured."""
    before = probe.free()
    cache = provisional_cache(model, 1, block_size)
    cache_bytes = 2 * cache.k.numel() * cache.k.element_size()
    static = StaticDecode(model, cache, max_num_seqs, model.cfg.max_position_embeddings, scratch_block=0)
    capture_decode_graphs(static)
    used = before - probe.free() - cache_bytes
    del static, cache
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return max(0, used)


def weights_bytes(model: Decoder) -> int:
    """Bytes of the parameters and buffers this engine's decoder holds (one rank's shard)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_and_plan(model: Decoder, probe: MemoryProbe, *, gpu_memory_utilization: float, block_size: int,
                     max_num_batched_tokens: int, max_num_seqs: int, cuda_graphs: bool,
                     kv_cache_tokens: int | None) -> MemoryPlan:
    """Steps 2-4 of memory_plan.py's start-up order for a loaded decoder."""
    check_utilization(gpu_memory_utilization)
    p = next(model.parameters())
    cfg = model.cfg
    activations = profile_activations(model, probe, max_num_batched_tokens=max_num_batched_tokens,
                                      max_num_seqs=max_num_seqs, block_size=block_size)
    graphs = measure_decode_graphs(model, probe, max_num_seqs=max_num_seqs, block_size=block_size) if cuda_graphs else 0
    return plan_kv_cache(device=str(p.device), total=probe.total(), free=probe.free(),
                         gpu_memory_utilization=gpu_memory_utilization, weights=weights_bytes(model),
                         activations=activations, graphs=graphs,
                         kv_bytes_per_token=kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, p.dtype),
                         block_size=block_size, min_tokens=max_num_batched_tokens, kv_cache_tokens=kv_cache_tokens)
