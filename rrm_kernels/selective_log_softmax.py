"""Token log-probabilities of given labels without materialising [tokens, vocab] in fp32.

GRPO needs log p(label) for every generated token: log_softmax(hidden @ W.T / T)[label]. Done
naively that is an fp32 [N, V] tensor (N = 16K tokens x 152K vocab = 10 GB), plus as much again
for its gradient. Here the tokens go through in chunks of chunk_size rows: each chunk's logits
exist only inside the loop, forward saves one fp32 log-normaliser per token, and backward
recomputes the chunk's logits to form (onehot - softmax) / T, the gradient of the logits.
Both passes make the logits in one dtype, fixed in forward: autocast's when the caller runs under
autocast (the trainer's bf16 forward), else the inputs'. Backward usually runs outside autocast, so
it must not pick its own: fp32 logits against a bf16 forward's log-normaliser were 6-11% off.

Two entry points:
  selective_log_softmax(hidden [N, H], weight [V, H], labels [N], temperature, chunk_size)
      autograd through hidden and weight (the lm_head); the one the trainer uses.
  token_logprobs(logits [N, V], labels [N], temperature)
      no autograd; for logits that already exist (e.g. the engine's). On CUDA (or forced) a
      Triton kernel reads each row once in its own dtype and never writes an fp32 copy.
Labels equal to ignore_index (-100) give 0 and no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100


def _check_labels(labels: torch.Tensor, n: int, vocab: int, ignore_index: int) -> None:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bad.any():
        raise ValueError(f"labels at positions {bad.nonzero().flatten().tolist()[:10]} are outside [0, {vocab}) "
                         f"and are not ignore_index={ignore_index}")


def _chunk_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                    ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 log p(label) and log-normaliser for one chunk of logits [C, V]."""
    scaled = logits.float() / temperature
    lse = torch.logsumexp(scaled, dim=1)
    valid = labels != ignore_index
    picked = scaled.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return torch.where(valid, picked - lse, 0.0), lse


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the chunk logits are computed in: autocast's when it is on for this device (what
    `hidden @ weight.T` would give under it), else the inputs' common dtype."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h [C, H] @ w.T in the inputs' dtype, with autocast off: the one place chunk logits are made,
    so backward recomputes exactly what forward reduced."""
    with torch.autocast(h.device.type, enabled=False):
        return h @ w.T


class _SelectiveLogSoftmax(torch.autograd.Function):
    """Forward and backward compute the chunk logits in the same dtype (decided in forward, see
    compute_dtype), so backward's softmax uses the forward's own log-normaliser: under bf16
    autocast the logits are bf16 in both passes even though backward runs outside autocast."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float,
                chunk_size: int, ignore_index: int, use_triton: bool) -> torch.Tensor:
        dtype = compute_dtype(hidden, weight)
        w = weight.to(dtype)  # once, not per chunk (a no-op when it already has that dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        # the Triton reduction reads the chunk's logits in their own dtype: no fp32 [chunk, V] copy
        reduce = _token_logprobs_triton if use_triton else _chunk_logprobs
        for s in range(0, hidden.shape[0], chunk_size):
            e = s + chunk_size
            out[s:e], lse[s:e] = reduce(_chunk_logits(hidden[s:e].to(dtype), w), labels[s:e], temperature,
                                        ignore_index)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.chunk_size, ctx.ignore_index, ctx.dtype = temperature, chunk_size, ignore_index, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        t, chunk, dtype = ctx.temperature, ctx.chunk_size, ctx.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            e = s + chunk
            h, lab = hidden[s:e].to(dtype), labels[s:e]
            valid = lab != ctx.ignore_index
            # d log p(label) / d logits = (onehot(label) - softmax) / T, the softmax recomputed per
            # chunk from the same logits forward reduced (same dtype), against forward's lse
            probs = torch.exp(_chunk_logits(h, w).float() / t - lse[s:e, None])
            g = -probs
            g.scatter_add_(1, torch.where(valid, lab, 0)[:, None], torch.ones_like(g[:, :1]))
            g *= (grad_out[s:e] * valid / t)[:, None]
            # the two matmuls in the compute dtype too (as autograd through autocast would run them);
            # the weight gradient accumulates over chunks in fp32
            g = g.to(dtype)
            if need_h:
                grad_h[s:e] = _chunk_logits(g, w.T).to(hidden.dtype)
            if need_w:
                grad_w += _chunk_logits(g.T, h.T).float()
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None, None, None


def selective_log_softmax(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 1.0, chunk_size: int = 1024,
                          ignore_index: int = IGNORE_INDEX, backend: str = "auto") -> torch.Tensor:
    """log_softmax(hidden @ weight.T / temperature)[i, labels[i]] -> [N] fp32, chunk by chunk,
    differentiable w.r.t. hidden and weight (each chunk's logits recomputed in backward).
    backend: the forward's row reduction, "auto" (Triton on CUDA), "triton" or "torch"."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'triton' or 'torch'")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_labels(labels, hidden.shape[0], weight.shape[0], ignore_index)
    use_triton = backend == "triton" or (backend == "auto" and hidden.is_cuda)
    return _SelectiveLogSoftmax.apply(hidden, weight, labels, float(temperature), int(chunk_size), ignore_index,
                                      use_triton)


def selective_log_softmax_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The whole [N, V] fp32 log_softmax, then gather: what the chunked version must equal."""
    logp = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    valid = labels != ignore_index
    return torch.where(valid, logp.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0], 0.0)


# ---------------------------------------------------------------- logits -> log p(label), Triton

@triton.jit
def _token_logprob_kernel(logits_ptr, stride_row, labels_ptr, out_ptr, lse_ptr, V, inv_t, ignore_index,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, x)
        s = tl.where(m_new > float("-inf"), s * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
        m = m_new
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - top), 0.0), axis=0))
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    picked = tl.load(base + tl.where(valid, label, 0)).to(tl.float32) * inv_t
    tl.store(out_ptr + row, tl.where(valid, picked - lse, 0.0))
    tl.store(lse_ptr + row, lse)


def _token_logprobs_triton(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                           ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label), log-normaliser) per row, reading each row once in its own dtype."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n, v = logits.shape
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(out)
    if n:
        _token_logprob_kernel[(n,)](logits, logits.stride(0), labels, out, lse, v, 1.0 / temperature, ignore_index,
                                    BLOCK=min(4096, triton.next_power_of_2(v)), num_warps=8)  # 4 warps: 121 regs
    return out, lse


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   ignore_index: int = IGNORE_INDEX, backend: str = "auto", chunk_size: int = 1024) -> torch.Tensor:
    """log_softmax(logits / temperature)[i, labels[i]] -> [N] fp32, without an fp32 [N, V] copy.
    backend: "auto" (Triton on CUDA, chunked torch elsewhere), "triton", "torch"."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_labels(labels, logits.shape[0], logits.shape[1], ignore_index)
    n, v = logits.shape
    if backend == "torch" or (backend == "auto" and not logits.is_cuda):
        out = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk_size):
            out[s:s + chunk_size] = _chunk_logprobs(logits[s:s + chunk_size], labels[s:s + chunk_size],
                                                    temperature, ignore_index)[0]
        return out
    if backend not in ("auto", "triton"):
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'triton' or 'torch'")
    return _token_logprobs_triton(logits, labels, temperature, ignore_index)[0]
