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
    x - log(-log(u)), u = rrm_kernels.rng uniform(seed, offset, token index). That is an exact
    sample of softmax(x) renormalised over the kept set, needs no sort, and depends only on
    (seed, offset), never on the batch around the sample. Two samples with the same seed and
    offset draw the same token: give the n sequences of one request different seeds.
  * Greedy: argmax of the row (first index on exact ties).
  * NaN or +inf in a logits row raises ValueError naming the rows; so does a row of all -inf.
    With return_status=True nothing is raised for them: a per-sample flag reports them instead
    (the engine fails that request alone and samples the rest of the batch). The same holds for a
    sample's own values (temperature not finite or < 0, top_k < 0, top_p or min_p out of range):
    checked (validate=True), they raise, or with return_status=True flag that sample alone.

Implementations:
  * sample_ref (torch; the CPU path): sorts only when top-k / top-p are on, and hashes uniforms
    only for tokens that can still win the race (see gumbel_race_ref).
  * sample_triton: no sort. Pass 1 gives max, argmax, log-normaliser and bad-value flags; then
    the top-k and top-p thresholds are found by a search over the order-preserving integer image
    of the fp32 values, each pass counting (and summing the mass of) the tokens above NUM_PROBES
    probe thresholds at once (~8 passes for 32 bits; top-p starts from a provable lower bracket);
    a last pass runs the race. Greedy rows stop after pass 1. The kept set equals the reference's
    except when the accumulated mass lands within fp32 rounding of top_p (summation order differs).
  * sample(..., backend="csrc", all_greedy=True): the CUDA C++ greedy kernel in rrm_kernels/csrc/.
Not yet run on a GPU: correctness is tested in Triton's interpreter, and CI compiles the kernel
for sm_90 (tests/test_csrc_build.py); launch parameters are first guesses.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rng import GUMBEL_MAX, row_keys_tl, row_keys_torch, uniform_from_keys_torch, uniform_tl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------- validation

def _check_inputs(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor,
                  top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  seeds: torch.Tensor, offsets: torch.Tensor, check_values: bool, scan_logits: bool = True) -> None:
    """Shapes/dtypes always; with check_values also the values (one host sync), scanning the
    logits for NaN/+inf unless scan_logits is False (the Triton kernel flags those itself)."""
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
    # one reduction finds both: max propagates NaN, is +inf with an +inf, -inf for a dead row
    row_max = logits.amax(dim=1) if scan_logits else torch.zeros(r, device=logits.device)
    bad_rows = torch.isnan(row_max) | torch.isposinf(row_max)
    dead_rows = torch.isneginf(row_max)
    # (violated?, message) pairs; the messages are only formatted for what failed
    rules = [
        (bad_rows.any(), lambda: f"logits rows {bad_rows.nonzero().flatten().tolist()} contain NaN or +inf"),
        (dead_rows.any(), lambda: f"logits rows {dead_rows.nonzero().flatten().tolist()} are entirely -inf"),
        (((row_index < 0) | (row_index >= r)).any(),
         lambda: f"row_index values must lie in [0, {r}), got {row_index.tolist()}"),
        ((~torch.isfinite(temperature) | (temperature < 0)).any(),
         lambda: f"temperature must be finite and >= 0, got {temperature.tolist()}"),
        ((top_k < 0).any(), lambda: f"top_k must be >= 0 (0 = off), got {top_k.tolist()}"),
        (~((top_p > 0) & (top_p <= 1)).all(), lambda: f"top_p must lie in (0, 1] (1 = off), got {top_p.tolist()}"),
        (~((min_p >= 0) & (min_p <= 1)).all(), lambda: f"min_p must lie in [0, 1] (0 = off), got {min_p.tolist()}"),
    ]
    violated = torch.stack([bad for bad, _ in rules]).tolist()  # one host sync for every check
    problems = [message() for hit, (_, message) in zip(violated, rules) if hit]
    if problems:
        raise ValueError("; ".join(problems))


# ------------------------------------------------------------------------------------ reference

def filter_mask_ref(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the tokens the filters keep for temperature-scaled fp32 logits x [B, V]."""
    bsz, v = x.shape
    keep = x > float("-inf")  # masked vocabulary entries are never drawn
    k = top_k.long()
    k_on = (k > 0) & (k < v)
    if not bool((k_on | (top_p < 1)).any()):  # no sort needed: only min-p (one host check)
        log_min_p = torch.log(min_p.float())[:, None]
        return keep & ((x - x.max(dim=1, keepdim=True).values) >= log_min_p)
    sorted_x, order = x.sort(dim=1, descending=True)
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


def gumbel_race_ref(x: torch.Tensor, keep: torch.Tensor | None, seeds: torch.Tensor,
                    offsets: torch.Tensor) -> torch.Tensor:
    """argmax over kept tokens of x - log(-log u(seed, offset, token)), first index on ties.

    Exact but pruned: the noise never exceeds GUMBEL_MAX, and the row's best kept x with its own
    noise is a lower bound on the winning score, so only tokens within GUMBEL_MAX of that bound
    can win; the uniforms are hashed for those alone (a few per row instead of the vocabulary)."""
    b = x.shape[0]
    xm = x if keep is None else x.masked_fill(~keep, float("-inf"))
    top = xm.argmax(dim=1)
    top_x = xm.gather(1, top[:, None])[:, 0]
    h1, h2 = row_keys_torch(seeds, offsets)
    bound = top_x - torch.log(-torch.log(uniform_from_keys_torch(h1, h2, top)))
    rows, cols = (xm + GUMBEL_MAX >= bound[:, None]).nonzero(as_tuple=True)
    score = xm[rows, cols] - torch.log(-torch.log(uniform_from_keys_torch(h1[rows], h2[rows], cols)))
    best = torch.full((b,), float("-inf"), device=x.device).scatter_reduce(0, rows, score, "amax")
    won = score == best[rows]
    return torch.full((b,), x.shape[1], dtype=torch.int64, device=x.device).scatter_reduce(
        0, rows[won], cols[won], "amin")


def sample_ref(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
               *, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch sampler (sorts only when top-k / top-p are on; runs anywhere, and is the CPU
    path). See the module docstring for the semantics."""
    _check_inputs(logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets, validate)
    b, v = row_index.shape[0], logits.shape[1]
    if b == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device), torch.empty(0, device=logits.device)
    greedy = temperature == 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    x = logits.index_select(0, row_index.long()).float() / t[:, None]
    any_filter = bool(((top_k > 0) & (top_k < v) | (top_p < 1) | (min_p > 0)).any())  # one host check
    keep = filter_mask_ref(x, top_k, top_p, min_p) if any_filter else None
    tokens = torch.where(greedy, x.argmax(dim=1), gumbel_race_ref(x, keep, seeds, offsets))
    logprobs = x.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(x, dim=1)
    return tokens, logprobs


def top_logprobs_ref(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor,
                     n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n most likely tokens of each sample's log_softmax(logits / T) (T = 1 when greedy):
    ids [B, n] int64, logprobs [B, n] f32, best first."""
    t = torch.where(temperature == 0, torch.ones_like(temperature), temperature).float()
    logp = torch.log_softmax(logits.index_select(0, row_index.long()).float() / t[:, None], dim=1)
    vals, ids = logp.topk(n, dim=1)
    return ids, vals


# ------------------------------------------------------------------------------------- dispatch

def bad_rows(logits: torch.Tensor) -> torch.Tensor:
    """[R] bool: rows holding NaN or +inf, or entirely -inf (one max reduction: amax propagates
    NaN, is +inf with an +inf and -inf for a dead row)."""
    m = logits.amax(dim=1)
    return torch.isnan(m) | torch.isinf(m)


SAMPLING_BACKENDS = ("auto", "triton", "torch", "csrc")
STATUS_BAD_LOGITS = 1  # the sample's logits row holds NaN or +inf, or is entirely -inf
STATUS_BAD_VALUES = 2  # its temperature, top_k, top_p or min_p is out of range (nothing was drawn for it)


def bad_values(temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor) -> torch.Tensor:
    """[B] bool: samples whose values the kernels reject (the ranges _check_inputs enforces), on
    the values' device, with no host sync."""
    return (~torch.isfinite(temperature) | (temperature < 0) | (top_k < 0)
            | ~((top_p > 0) & (top_p <= 1)) | ~((min_p >= 0) & (min_p <= 1)))


def sample(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
           *, validate: bool = True, backend: str = "auto", all_greedy: bool = False,
           return_status: bool = False):
    """The sampler the engine calls. backend: "auto" (Triton on CUDA, torch reference on CPU),
    "triton" (forced; on CPU needs TRITON_INTERPRET=1), "torch", or "csrc" (CUDA C++ greedy
    path, all_greedy only; JIT-built on first use, see rrm_kernels/csrc_ops.py). validate=False skips the value
    checks (one host sync), e.g. inside a CUDA graph where the caller has checked its inputs.
    all_greedy=True (the caller knows every temperature is 0) takes the one-pass greedy path.

    return_status=True: returns (tokens, logprobs, status) and never raises for bad logits; status
    [B] int32 is STATUS_BAD_LOGITS for a sample whose logits row holds NaN or +inf or is entirely
    -inf (its token and log-prob are then meaningless). The Triton and csrc kernels flag those rows
    in their first pass, so the caller reads the flags with the tokens in one transfer: no extra
    sync. With validate as well, a sample whose own values are out of range is STATUS_BAD_VALUES
    (drawn greedily instead; meaningless too) rather than an error for the whole batch: on the
    device, a few elementwise ops and no sync. A row_index out of range always raises: it is the
    caller's bug, not one sample's value."""
    if backend not in SAMPLING_BACKENDS:
        raise ValueError(f"unknown sampling backend {backend!r}; choose one of {SAMPLING_BACKENDS}")
    if return_status and validate and not all_greedy and row_index.numel():
        # one sample's values must not fail the others: replace them by greedy ones, flag them
        _check_inputs(logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets, False)  # shapes
        bad = bad_values(temperature, top_k, top_p, min_p)
        temperature = temperature.masked_fill(bad, 0.0)
        top_k = top_k.masked_fill(bad, 0)
        top_p = top_p.masked_fill(bad, 1.0)
        min_p = min_p.masked_fill(bad, 0.0)
        tokens, logprobs, status = _sample(logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets,
                                           validate=validate, backend=backend, all_greedy=all_greedy,
                                           return_status=True)
        return tokens, logprobs, status.masked_fill(bad, STATUS_BAD_VALUES)
    return _sample(logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets, validate=validate,
                   backend=backend, all_greedy=all_greedy, return_status=return_status)


def _sample(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
            top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
            *, validate: bool, backend: str, all_greedy: bool, return_status: bool):
    checks = (logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets)
    if backend == "torch" or (backend == "auto" and not logits.is_cuda):
        status = None
        if return_status:
            _check_inputs(*checks, validate, scan_logits=False)
            bad = bad_rows(logits)
            status = bad.index_select(0, row_index.long()).to(torch.int32)
            if logits.is_cuda or bool(bad.any()):  # a host check only where it is free
                logits = logits.masked_fill(bad[:, None], 0.0)  # bad rows draw from a harmless uniform row
            validate = False
        # greedy-only batch: argmax + log_softmax, no filters, no random numbers (on CPU the
        # all-zero check costs nothing; on CUDA pass all_greedy instead of syncing)
        if all_greedy or (not logits.is_cuda and row_index.numel() and bool((temperature == 0).all())):
            _check_inputs(*checks, validate)
            x = logits.index_select(0, row_index.long()).float()
            tokens = x.argmax(dim=1)
            out = tokens, torch.log_softmax(x, dim=1).gather(1, tokens[:, None])[:, 0]
        else:
            out = sample_ref(logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets, validate=validate)
        return (*out, status) if return_status else out
    if backend == "csrc":
        if not all_greedy:
            raise ValueError("backend='csrc' implements the greedy path only: pass all_greedy=True")
        from .csrc_ops import greedy_argmax_lse
        _check_inputs(*checks, validate, scan_logits=False)
        tokens, logprobs, status = greedy_argmax_lse(logits, row_index, with_status=True)
        if return_status:
            return tokens, logprobs, status
        if validate:
            _raise_for_status(status, row_index)
        return tokens, logprobs
    return sample_triton(logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets, validate=validate,
                         all_greedy=all_greedy, return_status=return_status)


def _raise_for_status(status: torch.Tensor, row_index: torch.Tensor) -> None:
    bad = status.nonzero().flatten()
    if bad.numel():
        rows = sorted(set(row_index[bad].tolist()))
        raise ValueError(f"logits rows {rows} contain NaN or +inf, or are entirely -inf")


# --------------------------------------------------------------------------------------- triton

NUM_PROBES = 16  # thresholds tested per pass of the search: each pass shrinks the interval ~17x


@triton.jit
def _order_key(x):
    """fp32 -> int64 with the same order (x + 0.0 first folds -0.0 into +0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _load_scaled(base, live, idx, V, t):
    """[BB, BLOCK] fp32 logits / T of BB samples (base: their row pointers); -inf past the row."""
    x = tl.load(base[:, None] + idx[None, :], mask=live[:, None] & (idx < V)[None, :], other=float("-inf"))
    return tl.math.div_rn(x.to(tl.float32), t[:, None]) + 0.0


@triton.jit
def _search(base, live, V, t, row_max, lo, hi, lo_mass, target, BY_MASS: tl.constexpr,
            BLOCK: tl.constexpr, NUM_PROBES: tl.constexpr):
    """Per sample, the largest key c in [lo, hi) with measure(x >= c) >= target, given that lo
    satisfies it and hi does not (a sample with hi == lo + 1 is already done). measure = count of
    tokens, or (BY_MASS) the sum of exp(x - row_max). Returns (c, the mass of {x >= c})."""
    j = (tl.arange(0, NUM_PROBES) + 1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    while tl.max(hi - lo, axis=0) > 1:
        probes = lo[:, None] + ((hi - lo)[:, None] * j[None, :]) // (NUM_PROBES + 1)  # [BB, P], in [lo, hi)
        count = tl.zeros(probes.shape, dtype=tl.float32)
        mass = tl.zeros(probes.shape, dtype=tl.float32)
        for start in range(0, V, BLOCK):
            x = _load_scaled(base, live, start + offs, V, t)
            above = _order_key(x)[:, :, None] >= probes[:, None, :]  # [BB, BLOCK, P]
            count += tl.sum(above.to(tl.float32), axis=1)
            mass += tl.sum(tl.where(above, tl.exp(x - row_max[:, None])[:, :, None], 0.0), axis=1)
        measure = mass if BY_MASS else count
        ok = measure >= target[:, None]
        new_lo = tl.max(tl.where(ok, probes, lo[:, None]), axis=1)
        found_mass = tl.max(tl.where(ok & (probes == new_lo[:, None]), mass, 0.0), axis=1)
        lo_mass = tl.where(new_lo == lo, lo_mass, found_mass)
        hi = tl.min(tl.where(ok, hi[:, None], probes), axis=1)
        lo = new_lo
    return lo, lo_mass


@triton.jit
def _sample_kernel(logits_ptr, stride_row, row_index_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                   seeds_ptr, offsets_ptr, tokens_ptr, logprobs_ptr, status_ptr, B, V,
                   GREEDY_ONLY: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr,
                   SEARCH_BLOCK: tl.constexpr, NUM_PROBES: tl.constexpr):
    # BLOCK_B samples per program: 1 for a large vocabulary, many for a small one
    bs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = bs < B
    base = logits_ptr + tl.load(row_index_ptr + bs, mask=live, other=0) * stride_row
    offs = tl.arange(0, BLOCK)
    if GREEDY_ONLY:
        t = tl.zeros([BLOCK_B], dtype=tl.float32)
    else:
        t = tl.load(temperature_ptr + bs, mask=live, other=0.0).to(tl.float32)
    greedy = t == 0.0
    t = tl.where(greedy, 1.0, t)

    # pass 1: per lane max (with its first index), min, sum of exp(x - max); bad values
    m_lane = tl.full([BLOCK_B, BLOCK], float("-inf"), tl.float32)
    s_lane = tl.zeros([BLOCK_B, BLOCK], dtype=tl.float32)
    min_lane = tl.full([BLOCK_B, BLOCK], float("inf"), tl.float32)
    arg_lane = tl.zeros([BLOCK_B, BLOCK], dtype=tl.int32)
    bad_lane = tl.zeros([BLOCK_B, BLOCK], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        x = _load_scaled(base, live, idx, V, t)
        bad_lane |= ((x != x) | (x == float("inf"))).to(tl.int32)
        m_new = tl.maximum(m_lane, x)
        s_lane = tl.where(m_new > float("-inf"), s_lane * tl.exp(m_lane - m_new) + tl.exp(x - m_new), 0.0)
        arg_lane = tl.where(x > m_lane, idx[None, :], arg_lane)  # strict: keeps each lane's first max
        m_lane = m_new
        min_lane = tl.where((idx < V)[None, :], tl.minimum(min_lane, x), min_lane)
    row_max = tl.max(m_lane, axis=1)
    row_sum = tl.sum(tl.where(m_lane > float("-inf"), s_lane * tl.exp(m_lane - row_max[:, None]), 0.0), axis=1)
    log_z = row_max + tl.log(row_sum)
    token = tl.min(tl.where(m_lane == row_max[:, None], arg_lane, V), axis=1)  # first index of the max
    token_x = row_max
    status = tl.max(bad_lane, axis=1) | (row_max == float("-inf")).to(tl.int32)
    tl.store(status_ptr + bs, status, mask=live)

    if not GREEDY_ONLY:
        sampled = live & ~greedy & (status == 0)
        if tl.max(sampled.to(tl.int32), axis=0) > 0:
            k = tl.load(top_k_ptr + bs, mask=live, other=0).to(tl.int64)
            top_p = tl.load(top_p_ptr + bs, mask=live, other=1.0).to(tl.float32)
            min_p = tl.load(min_p_ptr + bs, mask=live, other=0.0).to(tl.float32)
            top_key = _order_key(row_max) + 1
            # the kept set is {x >= thresh}; thresholds are order keys; start from "everything"
            thresh = _order_key(tl.min(min_lane, axis=1))
            kept_mass = row_sum
            k_on = sampled & (k > 0) & (k < V)
            thresh, kept_mass = _search(base, live, V, t, row_max, thresh, tl.where(k_on, top_key, thresh + 1),
                                        kept_mass, tl.where(k_on, k.to(tl.float32), 0.0), False,
                                        SEARCH_BLOCK, NUM_PROBES)
            p_on = sampled & (top_p < 1.0)
            # a lower bracket that already satisfies top-p: the tokens below row_max - log(V / (1 - p))
            # hold at most (1 - p) of exp(0) <= kept_mass (margin e^-1 for rounding). It saves passes.
            p_floor = row_max - tl.log(V / tl.maximum(1.0 - top_p, 1e-30)) - 1.0
            p_lo = tl.where(p_on, tl.maximum(thresh, _order_key(p_floor)), thresh)
            thresh, kept_mass = _search(base, live, V, t, row_max, p_lo, tl.where(p_on, top_key, p_lo + 1),
                                        kept_mass, tl.where(p_on, top_p * kept_mass, 0.0), True,
                                        SEARCH_BLOCK, NUM_PROBES)  # (its mass output is unused from here)
            log_min_p = tl.where(min_p > 0.0, tl.log(tl.maximum(min_p, 1e-30)), float("-inf"))  # -inf when off
            h1, h2 = row_keys_tl(tl.load(seeds_ptr + bs, mask=live, other=0),
                                 tl.load(offsets_ptr + bs, mask=live, other=0))
            # exponential race over the kept set: argmax of x - log(-log u)
            best = tl.full([BLOCK_B, BLOCK], float("-inf"), tl.float32)
            best_idx = tl.zeros([BLOCK_B, BLOCK], dtype=tl.int32)
            best_x = tl.zeros([BLOCK_B, BLOCK], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                x = _load_scaled(base, live, idx, V, t)
                keep = ((_order_key(x) >= thresh[:, None]) & (x - row_max[:, None] >= log_min_p[:, None])
                        & (idx < V)[None, :])
                u = uniform_tl(h1[:, None], h2[:, None], idx[None, :])
                score = tl.where(keep, x - tl.log(-tl.log(u)), float("-inf"))
                better = score > best
                best_idx = tl.where(better, idx[None, :], best_idx)
                best_x = tl.where(better, x, best_x)
                best = tl.maximum(best, score)
            top = tl.max(best, axis=1)
            race_token = tl.min(tl.where(best == top[:, None], best_idx, V), axis=1)
            race_x = tl.max(tl.where(best_idx == race_token[:, None], best_x, float("-inf")), axis=1)
            token = tl.where(sampled, race_token, token)
            token_x = tl.where(sampled, race_x, token_x)
    tl.store(tokens_ptr + bs, token.to(tl.int64), mask=live)
    tl.store(logprobs_ptr + bs, token_x - log_z, mask=live)


def sample_launch(b: int, v: int, block: int | None = None, block_b: int | None = None,
                  num_probes: int = NUM_PROBES) -> tuple[int, int, int, int]:
    """(BLOCK_B samples per program, BLOCK vocab tile, SEARCH_BLOCK, num_warps) for b samples of
    a v-token vocabulary. Several samples per program only when the vocabulary is small (tiles of
    ~2K elements): at a 152K vocabulary every program takes one sample, so 256 samples are 256
    programs (two per SM on an H100) rather than 128. 8 warps for a full 2K tile: 91
    registers/thread at sm_90 (ptxas) vs 161 with 4. First choices, not yet timed on a GPU:
    `bench.kernels --sweep` times block_b 1, 2 and 4."""
    blk = block or min(2048, triton.next_power_of_2(v))
    bb = block_b or max(1, min(64, triton.next_power_of_2(b), 2048 // blk))
    search_blk = max(1, min(blk, 4096 // (bb * num_probes)))
    warps = 8 if bb * blk >= 2048 else 4
    return bb, blk, search_blk, warps


def sample_triton(logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
                  *, validate: bool = True, all_greedy: bool = False,
                  block: int | None = None, block_b: int | None = None,
                  num_probes: int = NUM_PROBES, return_status: bool = False):
    """The Triton sampler (no sort; one program per sample, or per few samples of a small vocab). all_greedy=True takes the greedy fast
    path (one pass: argmax + logsumexp) without reading the sampling parameters. With validate,
    bad logits are reported after the kernel from a per-sample status flag it writes (one sync);
    return_status=True returns that flag instead (tokens, logprobs, status) and raises nothing for it."""
    # the kernel trusts the parameters (a bad row index would read out of bounds): check them first
    _check_inputs(logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets, validate, scan_logits=False)
    b, v = row_index.shape[0], logits.shape[1]
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    status = torch.empty(b, dtype=torch.int32, device=logits.device)
    if b == 0:
        return (tokens, logprobs, status) if return_status else (tokens, logprobs)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    bb, blk, search_blk, warps = sample_launch(b, v, block, block_b, num_probes)
    grid = (triton.cdiv(b, bb),)
    _sample_kernel[grid](logits, logits.stride(0), row_index, temperature, top_k, top_p, min_p, seeds, offsets,
                         tokens, logprobs, status, b, v, GREEDY_ONLY=all_greedy, BLOCK_B=bb, BLOCK=blk,
                         SEARCH_BLOCK=search_blk, NUM_PROBES=num_probes, num_warps=warps)
    if return_status:
        return tokens, logprobs, status
    if validate:
        _raise_for_status(status, row_index)
    return tokens, logprobs
