"""Attention: per-step metadata, the backend protocol, and one module per backend (torch_backend,
cpu_backend, triton_backend; choose.py picks one for a decoder). Importing this package loads
only the torch backend: the Triton and C++ ones load when chosen."""
from ...cache.kv_cache import KVCache
from .metadata import AttentionBackend, AttentionMetadata, PrefixLevel
from .torch_backend import (TorchAttention, attend_with_lse, dense_causal_attention, gather_kv, merge_by_lse,
                            prefill_attention, store_kv)

__all__ = ["KVCache", "AttentionBackend", "AttentionMetadata", "PrefixLevel", "TorchAttention", "attend_with_lse",
           "dense_causal_attention", "gather_kv", "merge_by_lse", "prefill_attention", "store_kv"]
