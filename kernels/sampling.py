"""Fused sampling: temperature, top-k, top-p, min-p, per-sample seeds, row indirection, log-probs.

Contract (sample and sample_ref take and return the same things):
  logits      [R, V] float (fp32 / fp16 / bf16)
  row_index   [B] int64   logits row each sample draws from (k samples of one row = k entries)
  temperature [B] f32     0 = greedy (argmax)
  top_k       [B] int32   0 = off (k >= V is off too)
  top_p       [B] f32     1.0 = off; must lie in (0, 1]
  min_p       [B] f32     0 = off; must lie in [0, 1]
  seeds       [B] int64   offsets [B] int64 (the sequence's step counter)
  -> tokens [B] int64, logprobs [B] f32

Semantics, shared by both implementations:
  * x = logits[row] / T (T = 1 for greedy rows), in fp32.
  * logprob = log_softmax(x)[token]: the temperature-scaled distribution BEFORE filtering (what a
    trainer recomputes from the model's logits), not the renormalised filtered one.
  * The filters all keep "every token whose x >= a threshold", so together they keep x >= the
    largest of their thresholds:
      top-k: threshold = the k-th largest x. Ties at the threshold are all kept (so more than k
             tokens survive when the k-th value is repeated).
      top-p: on the distribution renormalised over the top-k set (HF / vLLM order), keep the
             smallest set of most probable tokens whose mass >= top_p; the token that crosses
             top_p is kept, and so are all tokens tied with it.
      min-p: keep p >= min_p * p_max, evaluated as x - max(x) >= log(min_p). It is unchanged by
             renormalisation, so its order relative to the others does not matter.
  * The draw is the exponential race (Gumbel-max): token = argmax over kept tokens of
    x - log(-log(u)), u = kernels.rng uniform(seed, offset, token index). That is an exact
    sample of softmax(x) renormalised over the kept set, needs no sort, and depends only on
    (seed, offset), never on the batch around the sample. Two samples with the same seed and
    offset draw the same token: give the n sequences of one request different seeds.
  * Greedy: argmax of the row (first index on exact ties).
  * NaN or +inf in a logits row raises ValueError naming the rows; so does a row of all -inf.

The Triton kernel finds the top-k / top-p thresholds without sorting: a search over the
order-preserving int32 image of the fp32 values, each pass counting (and summing the mass of)
the tokens above NUM_PROBES probe thresholds at once. The kept set equals the reference's except
when the accumulated mass lands within fp32 rounding of top_p exactly (summation order differs).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .rng import row_keys_tl, uniform_tl, uniform_torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------- validation

def _check_inputs(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor,
                  top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  seeds: torch.Tensor, offsets: torch.Tensor, check_values: bool) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [rows, vocab], got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits dtype must be one of {_FLOAT_DTYPES}, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    if row_index.dim() != 1:
        raise ValueError(f"row_index must be 1-D [B], got shape {tuple(row_index.shape)}")
    b = row_index.shape[0]
    per_sample = dict(row_index=row_index, temperature=temperature, top_k=top_k, top_p=top_p,
                      min_p=min_p, seeds=seeds, offsets=offsets)
    for name, t in per_sample.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != (b,):
            raise ValueError(f"{name} must have shape [{b}] (one entry per sample), got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")
        is_float = t.dtype.is_floating_point
        wants_float = name in ("temperature", "top_p", "min_p")
        if is_float != wants_float or t.dtype == torch.bool:
            kind = "a floating" if wants_float else "an integer"
            raise ValueError(f"{name} must be {kind} tensor, got {t.dtype}")
    if not check_values or b == 0:
        return
    r = logits.shape[0]
    problems = []
    bad_rows = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=1)
    dead_rows = torch.isneginf(logits).all(dim=1)
    checks = torch.stack([
        bad_rows.any(), dead_rows.any(),
        ((row_index < 0) | (row_index >= r)).any(),
        (~torch.isfinite(temperature) | (temperature < 0)).any(),
        (top_k < 0).any(),
        ~((top_p > 0) & (top_p <= 1)).all(),
        ~((min_p >= 0) & (min_p <= 1)).all(),
    ]).tolist()  # one host sync for every check
    if checks[0]:
        problems.append(f"logits rows {bad_rows.nonzero().flatten().tolist()} contain NaN or +inf")
    if checks[1]:
        problems.append(f"logits rows {dead_rows.nonzero().flatten().tolist()} are entirely -inf")
    if checks[2]:
        problems.append(f"row_index values must lie in [0, {r}), got {row_index.tolist()}")
    if checks[3]:
        problems.append(f"temperature must be finite and >= 0, got {temperature.tolist()}")
    if checks[4]:
        problems.append(f"top_k must be >= 0 (0 = off), got {top_k.tolist()}")
    if checks[5]:
        problems.append(f"top_p must lie in (0, 1] (1 = off), got {top_p.tolist()}")
    if checks[6]:
        problems.append(f"min_p must lie in [0, 1] (0 = off), got {min_p.tolist()}")
    if problems:
        raise ValueError("; ".join(problems))


# ------------------------------------------------------------------------------------ reference

def filter_mask_ref(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the tokens the filters keep for temperature-scaled fp32 logits x [B, V]."""
    bsz, v = x.shape
    sorted_x, order = x.sort(dim=1, descending=True)
    keep = torch.ones_like(x, dtype=torch.bool)
    k = top_k.long()
    k_on = (k > 0) & (k < v)
    kth = sorted_x.gather(1, (k.clamp(1, v) - 1)[:, None])  # [B, 1]
    keep &= ~k_on[:, None] | (x >= kth)
    # top-p over the distribution renormalised on the top-k set
    neg_inf = torch.tensor(float("-inf"), device=x.device)
    probs_sorted = torch.softmax(torch.where(keep.gather(1, order), sorted_x, neg_inf), dim=1)
    cum = probs_sorted.cumsum(dim=1)
    n_kept = keep.sum(dim=1)
    crossing = (cum < top_p.float()[:, None]).sum(dim=1).clamp(max=n_kept - 1)  # index of the crossing token
    p_thresh = sorted_x.gather(1, crossing[:, None])
    keep &= ~(top_p < 1)[:, None] | (x >= p_thresh)
    # min-p: p >= min_p * p_max  <=>  x - max >= log(min_p)
    log_min_p = torch.log(min_p.float())[:, None]  # -inf when off
    keep &= (x - sorted_x[:, :1]) >= log_min_p
    return keep


def sample_ref(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
               *, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch sampler (sorts; runs anywhere). See the module docstring for the semantics."""
    _check_inputs(logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets, validate)
    b, v = row_index.shape[0], logits.shape[1]
    if b == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device), torch.empty(0, device=logits.device)
    greedy = temperature == 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    x = logits.index_select(0, row_index.long()).float() / t[:, None]
    logp = torch.log_softmax(x, dim=1)
    keep = filter_mask_ref(x, top_k, top_p, min_p)
    u = uniform_torch(seeds, offsets, v)
    race = torch.where(keep, x - torch.log(-torch.log(u)), torch.tensor(float("-inf"), device=x.device))
    tokens = torch.where(greedy, x.argmax(dim=1), race.argmax(dim=1))
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def top_logprobs_ref(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor,
                     n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n most likely tokens of each sample's log_softmax(logits / T) (T = 1 when greedy):
    ids [B, n] int64, logprobs [B, n] f32, best first."""
    t = torch.where(temperature == 0, torch.ones_like(temperature), temperature).float()
    logp = torch.log_softmax(logits.index_select(0, row_index.long()).float() / t[:, None], dim=1)
    vals, ids = logp.topk(n, dim=1)
    return ids, vals


# ------------------------------------------------------------------------------------- dispatch

def sample(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
           *, validate: bool = True, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler the engine calls. backend: "auto" (Triton on CUDA, torch reference on CPU),
    "triton" (forced; on CPU needs TRITON_INTERPRET=1), "torch". validate=False skips the value
    checks (one host sync), e.g. inside a CUDA graph where the caller has checked its inputs."""
    if backend == "torch" or (backend == "auto" and not logits.is_cuda):
        return sample_ref(logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets, validate=validate)
    if backend not in ("auto", "triton"):
        raise ValueError(f"unknown sampling backend {backend!r}; choose 'auto', 'triton' or 'torch'")
    return sample_triton(logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets, validate=validate)


def sample_triton(*args, **kwargs):  # replaced by the Triton kernel in the next commit
    raise NotImplementedError("the Triton sampling kernel is not committed yet; use backend='torch'")
