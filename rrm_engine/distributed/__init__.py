"""Scale-out: tensor parallelism inside a node (torch.distributed) and a Ray pool of replicas."""
from .tensor_parallel import agree_min, init_tensor_parallel, shard_decoder, shard_for_engine, tensor_parallel_launch

__all__ = ["agree_min", "init_tensor_parallel", "shard_decoder", "shard_for_engine", "tensor_parallel_launch"]
