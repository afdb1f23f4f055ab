"""Loader for the CUDA C++ ops in rrm_kernels/csrc/: JIT-built with torch.utils.cpp_extension.load the first
time one is used on a machine with CUDA (about a minute; cached by torch afterwards).

Only op so far: greedy_argmax_lse (rrm_kernels/csrc/greedy_argmax_lse.cu explains why it is hand-written).
rrm_kernels.sampling.sample(..., backend="csrc", all_greedy=True) selects it, and the engine does for
its all-greedy steps with LLM(..., sampler_backend="csrc").
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC_DIR / "greedy_argmax_lse.cpp", CSRC_DIR / "greedy_argmax_lse.cu")
_THREADS, _MAX_SPLITS = 256, 64


def available() -> bool:
    """True when CUDA is present and the sources are there (building may still fail: see load)."""
    return torch.cuda.is_available() and all(p.exists() for p in SOURCES)


@functools.cache
def load():
    """Build (or reuse torch's cached build of) the extension module."""
    if not available():
        raise RuntimeError("csrc ops need CUDA and the rrm_kernels/csrc/ sources next to rrm_kernels/ "
                           f"(cuda available: {torch.cuda.is_available()}, sources: {[str(p) for p in SOURCES]})")
    from torch.utils.cpp_extension import load as jit_load
    return jit_load(name="rrm_csrc", sources=[str(p) for p in SOURCES], extra_cflags=["-O3", "-std=c++20"],
                    extra_cuda_cflags=["-O3"], verbose=False)


@functools.cache
def _tickets(device: torch.device, size: int) -> torch.Tensor:
    # zeroed once; every launch leaves them zeroed again, so they are reused (and graph-safe)
    return torch.zeros(size, dtype=torch.int32, device=device)


def default_splits(samples: int, vocab: int, device: torch.device) -> int:
    """Enough blocks to fill the GPU about twice, but at least ~16 KB of logits per block."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    by_occupancy = -(-2 * sms // max(samples, 1))
    by_size = max(1, vocab // (_THREADS * 16))
    return max(1, min(by_occupancy, by_size, _MAX_SPLITS))


def greedy_argmax_lse(logits: torch.Tensor, row_index: torch.Tensor, splits: int | None = None,
                      with_status: bool = False):
    """tokens [B] = argmax(logits[row_index]) (first index on ties), logprobs [B] f32 =
    log_softmax(logits[row_index])[tokens]; with_status also status [B] int32, 1 where the row
    holds NaN or +inf (left out of the argmax and the sum) or is entirely -inf. The flag comes
    from the same pass: checking it is the caller's job (rrm_kernels.sampling.sample does)."""
    mod = load()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    row_index = row_index.to(torch.int64).contiguous()
    b = row_index.shape[0]
    size = 1 << max(b - 1, 0).bit_length()  # power-of-two buckets so the cache stays small
    splits = splits or default_splits(b, logits.shape[1], logits.device)
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    tokens, logprobs, status = mod.greedy_argmax_lse(logits, row_index, _tickets(logits.device, size), splits, stream)
    return (tokens, logprobs, status) if with_status else (tokens, logprobs)


def greedy_argmax_lse_ref(logits: torch.Tensor, row_index: torch.Tensor, with_status: bool = False):
    """The same contract in torch (status from the row's max: NaN, +inf or -inf)."""
    x = logits.index_select(0, row_index.long()).float()
    tokens = x.argmax(dim=1)
    logprobs = torch.log_softmax(x, dim=1).gather(1, tokens[:, None])[:, 0]
    if not with_status:
        return tokens, logprobs
    m = x.amax(dim=1)
    return tokens, logprobs, (torch.isnan(m) | torch.isinf(m)).to(torch.int32)
