"""Scale-out: tensor parallelism inside a node (torch.distributed) and a Ray pool of replicas."""
from .tensor_parallel import (RankShard, agree_min, init_tensor_parallel, shard_decoder, shard_for_engine,
                              tensor_parallel_launch)

__all__ = ["JudgePool", "RankShard", "agree_min", "init_tensor_parallel", "shard_decoder", "shard_for_engine",
           "tensor_parallel_launch"]


def __getattr__(name: str):
    # lazily: the pool imports the judge layer (and Ray when built); tensor parallelism needs neither
    if name in ("JudgePool", "PoolStats"):
        from . import ray_pool
        return getattr(ray_pool, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
