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
Loading: every rank reads only its slices of the checkpoint (loader.load(shard=RankShard(...)) cuts
an empty decoder to the rank's shapes, then reads each tensor's part with safetensors get_slice);
a GGUF is converted whole once into a cached HF dir, then read the same way.
Launch: torchrun / tensor_parallel_launch (every rank runs the caller's script), or
LLM(path, tensor_parallel_size=N) from one process, which spawns its ranks (tp_workers.py).
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

from ..layers.fused_linear import FusedLinear
from ..model.decoder import Decoder


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


# Which part of each checkpoint tensor a rank keeps, by the tensor's (Hugging Face) name. The
# in-memory sharding (shard_decoder) and the loader's sliced reads (RankShard.part) both go
# through this table, so a checkpoint loaded shard by shard equals a full one sharded in memory.
_COLUMN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
           "mlp.gate_proj.weight", "mlp.up_proj.weight")  # output features split: dim 0
_ROW = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # input features split: dim 1
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")  # vocabulary rows, equal slices, last one zero-padded


def shard_part(name: str, shape: tuple[int, ...], rank: int, world: int) -> tuple[tuple[slice, ...], int]:
    """(index into the full tensor, zero rows to append) of `rank`'s part of checkpoint tensor
    `name`; the full index for tensors every rank keeps whole (norms)."""
    whole = tuple(slice(None) for _ in shape)
    if world == 1:
        return whole, 0
    if name in _VOCAB:
        per = -(-shape[0] // world)
        start, stop = min(rank * per, shape[0]), min((rank + 1) * per, shape[0])
        return (slice(start, stop),) + whole[1:], per - (stop - start)
    dim = 0 if name.endswith(_COLUMN) else 1 if name.endswith(_ROW) else None
    if dim is None:
        return whole, 0
    per = shape[dim] // world  # divisibility is checked before any tensor is cut
    index = list(whole)
    index[dim] = slice(rank * per, (rank + 1) * per)
    return tuple(index), 0


def take_part(name: str, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a full tensor already in memory (works on the meta device too)."""
    index, pad = shard_part(name, tuple(t.shape), rank, world)
    part = t[index]
    if pad:
        part = torch.cat([part, part.new_zeros(pad, *part.shape[1:])])
    return part.contiguous()


def check_divisible(cfg: Any, world: int) -> None:
    for what, n in (("num_attention_heads", cfg.num_heads), ("num_key_value_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % world:
            raise ValueError(f"tensor_parallel_size={world} does not divide {what}={n}")


def shard_decoder(model: Decoder, rank: int, world: int, group: Any = None) -> Decoder:
    """Shard a full decoder in place for this rank (on the meta device too: the loader shards an
    empty decoder, then reads only this rank's slices into it). Heads and KV heads must divide by world."""
    cfg = model.cfg
    if world == 1:
        return model
    check_divisible(cfg, world)

    def take(name: str, t: torch.Tensor) -> torch.Tensor:
        return take_part(name, t.data, rank, world)

    def fused_column(prefix: str, linear: FusedLinear) -> None:
        """Each part of a fused projection (q, k, v or gate, up) is cut on its own, by its checkpoint
        name; this rank keeps its rows of every part, still stacked in part order."""
        for t in ("weight", "bias"):
            fused = getattr(linear, t)
            if fused is None:
                continue
            parts = fused.data.split(linear.part_sizes, dim=0)
            mine = [take(f"{prefix}{name}.{t}", part) for name, part in zip(linear.part_names, parts)]
            setattr(linear, t, nn.Parameter(torch.cat(mine), requires_grad=False))
        linear.part_sizes = [n // world for n in linear.part_sizes]
        linear.out_features = linear.weight.shape[0]

    for i, layer in enumerate(model.model.layers):
        attn, mlp, at = layer.self_attn, layer.mlp, f"model.layers.{i}."
        fused_column(f"{at}self_attn.", attn.qkv_proj)
        fused_column(f"{at}mlp.", mlp.gate_up_proj)
        attn.o_proj = RowParallelLinear(take(f"{at}self_attn.o_proj.weight", attn.o_proj.weight), group)
        mlp.down_proj = RowParallelLinear(take(f"{at}mlp.down_proj.weight", mlp.down_proj.weight), group)

    vocab = cfg.vocab_size
    start = rank * -(-vocab // world)
    emb = take("model.embed_tokens.weight", model.model.embed_tokens.weight)
    model.model.embed_tokens = VocabParallelEmbedding(emb, start, group)
    if not cfg.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(take("lm_head.weight", model.lm_head.weight), requires_grad=False)

    def gather_logits(local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=-1)[..., :vocab]

    model.serve_with(model.serving.replace(gather_logits=gather_logits))
    model.cfg = dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                                    intermediate_size=cfg.intermediate_size // world)
    return model


@dataclasses.dataclass(frozen=True)
class RankShard:
    """What the checkpoint loader needs to load one rank's shard only (loader.load(shard=...)):
    shard an empty decoder built on meta, then read each tensor's part of this rank."""
    rank: int
    world: int
    group: Any = None

    def shard(self, model: Decoder) -> None:
        shard_decoder(model, self.rank, self.world, self.group)

    def part(self, name: str, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], int]:
        return shard_part(name, shape, self.rank, self.world)


_HOW = ("launch one process per rank with `torchrun --nproc-per-node N script.py` (the script calls "
        "rrm_engine.distributed.init_tensor_parallel() first) or with "
        "rrm_engine.distributed.tensor_parallel_launch(fn, N)")


def check_tensor_parallel_size(tensor_parallel_size: Any) -> None:
    if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")


def launched_by_torchrun() -> bool:
    """This process is one rank of a launcher (torchrun sets these) that has not joined its group yet."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def rank_shard(tensor_parallel_size: int, group: Any = None) -> RankShard:
    """This process's shard, after checking that it is one rank of an initialised process group
    of tensor_parallel_size processes."""
    check_tensor_parallel_size(tensor_parallel_size)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"tensor_parallel_size={tensor_parallel_size} needs an initialised torch.distributed "
                           f"process group of that size; {_HOW}")
    world = dist.get_world_size(group)
    if world != tensor_parallel_size:
        raise RuntimeError(f"tensor_parallel_size={tensor_parallel_size} but the process group has {world} "
                           f"ranks; {_HOW}")
    return RankShard(dist.get_rank(group), world, group)


def shard_for_engine(model: Decoder, tensor_parallel_size: int, group: Any = None) -> tuple[int, int]:
    """Check that this process is one rank of a process group of tensor_parallel_size processes and
    shard `model` (loaded whole) for it in place. Returns (rank, world)."""
    shard = rank_shard(tensor_parallel_size, group)
    if model.gather_logits is not None:
        raise ValueError("this decoder is already sharded for tensor parallelism (load it again)")
    shard.shard(model)
    return shard.rank, shard.world


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
