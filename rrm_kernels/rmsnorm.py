"""Fused RMSNorm, optionally with the residual add in front of it (one read of x and residual,
one write of each result instead of a separate add kernel).

Numerics follow the decoder's RMSNorm (rrm_engine/model/decoder.py) and transformers: the residual sum
is rounded to x's dtype (it is the new residual stream), normalised in fp32, rounded back to x's
dtype, then multiplied by the weight; the output dtype is promote(weight, x) like the torch code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, R, W, OUT, RES_OUT, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    y = (xf * rstd).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(OUT + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(OUT.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., H] -> norm(x) ; with residual: (norm(x + residual), x + residual)."""
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"weight must be [{h}] for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    if x.device != weight.device or (residual is not None and residual.device != x.device):
        raise ValueError("x, weight and residual must be on one device")
    x2 = x.reshape(-1, h)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, h), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty_like(x2) if residual is not None else out
    r2 = residual.reshape(-1, h).contiguous() if residual is not None else x2
    if rows:
        block = triton.next_power_of_2(h)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0), h, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    out = out.view(*x.shape[:-1], h)
    if residual is None:
        return out
    return out, res_out.view(x.shape)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = weight * y
    return out if residual is None else (out, x)
