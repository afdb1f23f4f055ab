"""From logits rows to tokens: builds the per-sample tensors for rrm_kernels.sampling and, for the
samples that ask, the model's log-probs (top-k and chosen ids). Everything the host needs comes
back in one transfer, the step's single host sync, including a per-sample flag for a logits row
that holds NaN or +inf (or is entirely -inf): such a sample comes back with bad_logits=True and
the engine fails its request alone. A sample whose sampling values the kernels would reject
(SamplingParams changed after it was validated) is failed the same way, alone, with `error`
naming the field: it is drawn greedily in the batch and its result thrown away, so one request's
values never fail the step (checked on the host from the Python values: no device work, no sync).

Backends (the engine's sampler_backend): "auto" (Triton on CUDA, torch on CPU), "triton",
"torch", or "csrc": the CUDA C++ greedy kernel for steps whose every sample is greedy, Triton
for the others."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rrm_kernels import cpu_ops
from rrm_kernels.sampling import SAMPLING_BACKENDS, STATUS_BAD_VALUES
from rrm_kernels.sampling import sample as fused_sample

from ..sampling_params import SamplingParams

_MASK63 = (1 << 63) - 1
_STAND_IN = SamplingParams(temperature=0.0)  # drawn in place of a sample whose values were rejected


def sample_seed(base_seed: int, index: int) -> int:
    """Seed of sample `index` of a request: a fixed mix of (base_seed, index) (splitmix64 steps)."""
    x = (base_seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    for _ in range(2):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK63


def _unfiltered(p: SamplingParams, vocab: int) -> bool:
    """No filter would remove a token (the reference's test: top-k off or >= vocab, top-p 1, min-p 0)."""
    return (p.top_k <= 0 or p.top_k >= vocab) and p.top_p >= 1.0 and p.min_p <= 0.0


@dataclass
class SampleRequest:
    row: int  # logits row
    params: SamplingParams
    seed: int
    offset: int  # the sequence's generated-token index


@dataclass
class SampleResult:
    token: int
    logprob: float  # under the sampling distribution log_softmax(logits / T) (T = 1 when greedy)
    extra: dict[int, float] | None  # model log-probs (log_softmax of raw logits), when asked
    bad_logits: bool = False  # its logits row held NaN/+inf or was all -inf: token and log-probs are meaningless
    error: str | None = None  # its sampling values were rejected (why, naming the field): nothing was drawn for it


def check_backend(backend: str) -> str:
    if backend not in SAMPLING_BACKENDS:
        raise ValueError(f"sampler_backend must be one of {SAMPLING_BACKENDS}, got {backend!r}")
    return backend


def kernel_backend(backend: str, all_greedy: bool) -> str:
    """The rrm_kernels.sampling backend for one step: csrc serves only all-greedy steps."""
    return "auto" if backend == "csrc" and not all_greedy else backend


def value_problems(reqs: list[SampleRequest], vocab: int) -> dict[int, str]:
    """{sample index: why} for the samples whose values the sampler would reject. Each distinct
    SamplingParams is checked once (the n samples of a request share one)."""
    seen: dict[int, str | None] = {}
    problems: dict[int, str] = {}
    for i, r in enumerate(reqs):
        key = id(r.params)
        if key not in seen:
            seen[key] = r.params.sampler_problem(vocab)
        if seen[key] is not None:
            problems[i] = seen[key]
    return problems


def sample(logits: torch.Tensor, reqs: list[SampleRequest], backend: str = "auto") -> list[SampleResult]:
    dev = logits.device
    problems = value_problems(reqs, logits.shape[1])
    if problems:
        reqs = [replace(r, params=_STAND_IN) if i in problems else r for i, r in enumerate(reqs)]
    p = [r.params for r in reqs]
    row_index = torch.tensor([r.row for r in reqs], dtype=torch.int64).to(dev, non_blocking=True)
    temperature = torch.tensor([x.temperature for x in p], dtype=torch.float32).to(dev, non_blocking=True)
    top_k = torch.tensor([x.top_k for x in p], dtype=torch.int32).to(dev, non_blocking=True)
    top_p = torch.tensor([x.top_p for x in p], dtype=torch.float32).to(dev, non_blocking=True)
    min_p = torch.tensor([x.min_p for x in p], dtype=torch.float32).to(dev, non_blocking=True)
    seeds = torch.tensor([r.seed for r in reqs], dtype=torch.int64).to(dev, non_blocking=True)
    offsets = torch.tensor([r.offset for r in reqs], dtype=torch.int64).to(dev, non_blocking=True)
    all_greedy = all(x.temperature == 0 for x in p)
    if (backend == "auto" and not logits.is_cuda and cpu_ops.is_loaded()
            and all(_unfiltered(x, logits.shape[1]) for x in p)):
        # CPU backend in use and no top-k / top-p / min-p: the C++ sampler, token for token the
        # torch reference's draw, bad rows flagged like it
        tokens, logprobs, status = cpu_ops.sample_unfiltered(logits, row_index, temperature, seeds, offsets,
                                                             return_status=True)
    else:
        # parameter checks cost a host sync: on GPU skip them (SamplingParams were validated when
        # added); bad logits never raise here, they come back as the status flags
        tokens, logprobs, status = fused_sample(logits, row_index, temperature, top_k, top_p, min_p, seeds, offsets,
                                                validate=not logits.is_cuda, all_greedy=all_greedy,
                                                backend=kernel_backend(backend, all_greedy), return_status=True)
    parts = [tokens.double(), logprobs.double(), status.double()]
    extra_at = [i for i, x in enumerate(p) if x.logprobs is not None or x.logprob_token_ids]
    if extra_at:
        idx = torch.tensor(extra_at, dtype=torch.int64).to(dev, non_blocking=True)
        logp = torch.log_softmax(logits.index_select(0, row_index[idx]).float(), dim=1)
        parts.append(logp.gather(1, tokens[idx][:, None])[:, 0].double())
        k = max((p[i].logprobs or 0) for i in extra_at)
        if k:
            vals, ids = logp.topk(k, dim=1)
            parts += [ids.double().flatten(), vals.double().flatten()]
        m = max(len(p[i].logprob_token_ids) for i in extra_at)
        if m:
            want = torch.tensor([p[i].logprob_token_ids + [0] * (m - len(p[i].logprob_token_ids)) for i in extra_at],
                                dtype=torch.int64).to(dev, non_blocking=True)
            parts.append(logp.gather(1, want).double().flatten())
    flat = torch.cat(parts).tolist()  # the one host sync
    b = len(reqs)
    out = [SampleResult(int(flat[i]), flat[b + i], None, flat[2 * b + i] not in (0, STATUS_BAD_VALUES))
           for i in range(b)]
    for i in range(b):
        if flat[2 * b + i] == STATUS_BAD_VALUES:  # not reached after value_problems; kept for a kernel's own check
            out[i].error = "temperature, top_k, top_p or min_p out of range"
    for i, why in problems.items():
        out[i].error = why
    if extra_at:
        e, pos = len(extra_at), 3 * b
        chosen, pos = flat[pos:pos + e], pos + e
        k = max((p[i].logprobs or 0) for i in extra_at)
        top_ids, top_vals = flat[pos:pos + e * k], flat[pos + e * k:pos + 2 * e * k]
        pos += 2 * e * k
        m = max(len(p[i].logprob_token_ids) for i in extra_at)
        for j, i in enumerate(extra_at):
            d = {out[i].token: chosen[j]}
            for t in range((p[i].logprobs or 0)):
                d.setdefault(int(top_ids[j * k + t]), top_vals[j * k + t])
            for t, tok in enumerate(p[i].logprob_token_ids):
                d.setdefault(tok, flat[pos + j * m + t])
            out[i].extra = d
    return out
