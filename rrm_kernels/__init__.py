"""Triton kernels for rrm_engine, each beside a pure-torch `*_ref` with the same signature.

This package imports nothing from rrm_engine. On a machine without a GPU set
TRITON_INTERPRET=1 before importing it (the kernels then run in Triton's numpy interpreter).
See rrm_kernels/README.md for the list, references and tested tolerances.
"""
from .paged_decode import paged_decode_attention, paged_decode_attention_ref
from .paged_prefill import paged_prefill_attention, paged_prefill_attention_ref
from .rmsnorm import rms_norm, rms_norm_ref
from .rope_store import rope_and_store, rope_and_store_ref
from .shared_prefix_decode import shared_prefix_decode_attention, shared_prefix_decode_attention_ref

__all__ = [
    "paged_decode_attention", "paged_decode_attention_ref",
    "paged_prefill_attention", "paged_prefill_attention_ref",
    "rms_norm", "rms_norm_ref",
    "rope_and_store", "rope_and_store_ref",
    "shared_prefix_decode_attention", "shared_prefix_decode_attention_ref",
]
