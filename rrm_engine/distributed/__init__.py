"""Scale-out: tensor parallelism inside a node (torch.distributed) and a Ray pool of replicas."""
from .tensor_parallel import init_tensor_parallel, shard_decoder, tensor_parallel_launch

__all__ = ["init_tensor_parallel", "shard_decoder", "tensor_parallel_launch"]
