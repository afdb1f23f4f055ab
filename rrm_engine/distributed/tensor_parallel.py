"""Tensor parallelism (Megatron style) over torch.distributed: NCCL on GPU, gloo on CPU.

Every rank runs the same engine on the same inputs (SPMD): the scheduler, sampler seeds and inputs
are identical, and the logits are all-gathered, so every rank samples the same tokens and the
engine needs no extra messages. Inside the decoder:
  q/k/v, gate/up  column-parallel: each rank keeps its own heads / intermediate rows of each part
                  of the fused qkv_proj / gate_up_proj (one GEMM each, as on one device);
  o, down         row-parallel: partial sums, one all-reduce per block half;
  embedding       vocab-parallel: rows split, ids outside the slice give zeros, all-reduce;
  LM head         vocab-parallel: each rank computes its vocab slice, all-gather.
The KV cache splits by KV head because each rank's model.cfg names only its own heads.
Inference only: the collectives here are not autograd-aware.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..fused_linear import FusedLinear
from ..model import Decoder


def init_tensor_parallel(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun (or tensor_parallel_launch) described in the environment.
    Returns (rank, world_size); on GPU each rank takes cuda:LOCAL_RANK."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return dist.get_rank(), dist.get_world_size()


class RowParallelLinear(nn.Module):
    """y = x_shard @ W_shard^T summed over ranks (input features split)."""

    def __init__(self, weight: torch.Tensor, group: Any):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, start: int, group: Any):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [V_shard, H], zero-padded at the end
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside.unsqueeze(-1)
        dist.all_reduce(x, group=self.group)
        return x


def _split(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, dim=dim)[rank].contiguous()


def _shard_fused_column(linear: FusedLinear, rank: int, world: int) -> None:
    """Column-parallel for a fused projection: each part (q, k, v or gate, up) is split on its own,
    and this rank keeps its slice of every part, still stacked in part order."""
    def shard(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([_split(part, 0, rank, world) for part in t.split(linear.part_sizes, dim=0)])

    linear.weight = nn.Parameter(shard(linear.weight.data), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(shard(linear.bias.data), requires_grad=False)
    linear.part_sizes = [n // world for n in linear.part_sizes]
    linear.out_features = linear.weight.shape[0]


def shard_decoder(model: Decoder, rank: int, world: int, group: Any = None) -> Decoder:
    """Shard a full decoder in place for this rank. Heads and KV heads must divide by world."""
    cfg = model.cfg
    if world == 1:
        return model
    for what, n in (("num_attention_heads", cfg.num_heads), ("num_key_value_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % world:
            raise ValueError(f"tensor_parallel_size={world} does not divide {what}={n}")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.qkv_proj, mlp.gate_up_proj):
            _shard_fused_column(lin, rank, world)
        attn.o_proj = RowParallelLinear(_split(attn.o_proj.weight.data, 1, rank, world), group)
        mlp.down_proj = RowParallelLinear(_split(mlp.down_proj.weight.data, 1, rank, world), group)

    # vocab slices of equal size (the last one zero-padded) so all_gather sees equal shapes
    vocab = cfg.vocab_size
    shard = -(-vocab // world)
    start = rank * shard

    def vocab_slice(w: torch.Tensor) -> torch.Tensor:
        part = w[start:start + shard]
        if part.shape[0] < shard:
            part = torch.cat([part, part.new_zeros(shard - part.shape[0], w.shape[1])])
        return part.contiguous()

    emb = model.model.embed_tokens.weight.data
    model.model.embed_tokens = VocabParallelEmbedding(vocab_slice(emb), start, group)
    if not cfg.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(vocab_slice(model.lm_head.weight.data), requires_grad=False)

    def gather_logits(local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=-1)[..., :vocab]

    model.gather_logits = gather_logits
    model.cfg = dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                                    intermediate_size=cfg.intermediate_size // world)
    return model


def shard_for_engine(model: Decoder, tensor_parallel_size: int, group: Any = None) -> tuple[int, int]:
    """Check that this process is one rank of a process group of tensor_parallel_size processes and
    shard `model` for it in place (LLM(..., tensor_parallel_size=N) calls this before it sizes the
    KV cache). Returns (rank, world)."""
    if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
    how = ("launch one process per rank with `torchrun --nproc-per-node N script.py` (the script calls "
           "rrm_engine.distributed.init_tensor_parallel() first) or with "
           "rrm_engine.distributed.tensor_parallel_launch(fn, N)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"tensor_parallel_size={tensor_parallel_size} needs an initialised torch.distributed "
                           f"process group of that size; {how}")
    world = dist.get_world_size(group)
    if world != tensor_parallel_size:
        raise RuntimeError(f"tensor_parallel_size={tensor_parallel_size} but the process group has {world} "
                           f"ranks; {how}")
    if model.gather_logits is not None:
        raise ValueError("this decoder is already sharded for tensor parallelism (load it again)")
    rank = dist.get_rank(group)
    shard_decoder(model, rank, world, group)
    return rank, world


def agree_min(value: int, device: torch.device | str = "cpu", group: Any = None) -> int:
    """The smallest `value` over the ranks. Every rank must size its KV cache alike, or their
    schedulers (and so their collectives) would part ways."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        init_tensor_parallel()
        result = fn(*args)
        if rank == 0:  # plain pickle bytes: the queue would pass tensors as shared-memory handles, which
            queue.put(("ok", pickle.dumps(result)))  # die with this process before the parent opens them
    except BaseException as e:  # report the failure instead of hanging the parent
        queue.put(("error", f"rank {rank}: {type(e).__name__}: {e}"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def tensor_parallel_launch(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 600.0) -> Any:
    """Run fn(*args) on `world` local processes joined in one process group (the Python-API
    counterpart of torchrun); returns rank 0's result. fn must be importable (module level)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free loopback port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:  # read before joining: a large result would otherwise block its sender forever
        status, result = queue.get(timeout=timeout)
    except Exception:
        status, result = "error", f"no result from rank 0 within {timeout:.0f}s"
    for p in procs:
        p.join(timeout=30 if status == "ok" else 1)
        if p.is_alive():
            p.kill()
    if status != "ok" or any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"tensor-parallel run failed: {result}")
    return pickle.loads(result)
