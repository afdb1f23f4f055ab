"""Tensor parallelism inside a node (torch.distributed): sharding, rank launch, collectives.
The Ray pool of judge replicas is the judge layer's (rrm_engine.judge.pool.JudgePool)."""
from .tensor_parallel import (RankShard, agree_min, init_tensor_parallel, shard_decoder, shard_for_engine,
                              tensor_parallel_launch)

__all__ = ["RankShard", "agree_min", "init_tensor_parallel", "shard_decoder", "shard_for_engine",
           "tensor_parallel_launch"]
