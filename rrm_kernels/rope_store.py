"""Rotary embedding on q and k plus the KV-cache store, in one kernel.

Convention: half-split (rotate_half), as rrm_engine.layers.rotary.apply_rotary: with x = [x1, x2] split
at D/2, out = [x1*cos1 - x2*sin1, x2*cos2 + x1*sin2] where cos = [cos1, cos2] (both halves are
read, so any table works; the usual one repeats the frequencies: cat(freqs, freqs)).

cos/sin are tables [max_positions, D] indexed by `positions` (the layout of
rrm_engine.layers.rotary.rotary_cos_sin over arange(max_positions)); a caller holding per-token rows
[T, D] passes positions = arange(T). Rows whose slot is negative are rotated but not stored
(padding). The cache is one layer's [num_blocks, block_size, Hkv, D].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(ptr_in, stride_h, cos1, sin1, cos2, sin2,
                  N_HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Loads [N_HEADS, D] at ptr_in and returns the rotated halves (fp32) and their mask."""
    h = tl.arange(0, H_PAD)
    j = tl.arange(0, HALF_PAD)
    mask = (h < N_HEADS)[:, None] & (j < HALF)[None, :]
    x1 = tl.load(ptr_in + h[:, None] * stride_h + j[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr_in + h[:, None] * stride_h + HALF + j[None, :], mask=mask, other=0.0).to(tl.float32)
    return x1 * cos1[None, :] - x2 * sin1[None, :], x2 * cos2[None, :] + x1 * sin2[None, :], mask


@triton.jit
def _store_halves(ptr, stride_h, o1, o2, mask, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    h = tl.arange(0, H_PAD)
    j = tl.arange(0, HALF_PAD)
    ty = ptr.dtype.element_ty
    tl.store(ptr + h[:, None] * stride_h + j[None, :], o1.to(ty), mask=mask)
    tl.store(ptr + h[:, None] * stride_h + HALF + j[None, :], o2.to(ty), mask=mask)


@triton.jit
def _rope_store_kernel(
    Q, K, V, POS, COS, SIN, KC, VC, SLOTS, QO, KO,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    HQ: tl.constexpr, HQ_PAD: tl.constexpr, HKV: tl.constexpr, HKV_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, STORE_K_OUT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    jm = j < HALF
    cos1 = tl.load(COS + pos * stride_cos + j, mask=jm, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + pos * stride_cos + HALF + j, mask=jm, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + pos * stride_sin + j, mask=jm, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + pos * stride_sin + HALF + j, mask=jm, other=0.0).to(tl.float32)
    q1, q2, qmask = _rotate_heads(Q + t * stride_qt, stride_qh, cos1, sin1, cos2, sin2, HQ, HQ_PAD, HALF, HALF_PAD)
    _store_halves(QO + t * stride_qot, stride_qoh, q1, q2, qmask, HQ_PAD, HALF, HALF_PAD)
    k1, k2, kmask = _rotate_heads(K + t * stride_kt, stride_kh, cos1, sin1, cos2, sin2, HKV, HKV_PAD, HALF, HALF_PAD)
    # rounded to k's dtype first, so the cache holds exactly the returned rotated k
    k1 = k1.to(KO.dtype.element_ty)
    k2 = k2.to(KO.dtype.element_ty)
    if STORE_K_OUT:
        _store_halves(KO + t * stride_kot, stride_koh, k1, k2, kmask, HKV_PAD, HALF, HALF_PAD)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot >= 0:
        _store_halves(KC + slot * stride_kc_slot, stride_kc_h, k1, k2, kmask, HKV_PAD, HALF, HALF_PAD)
        h = tl.arange(0, HKV_PAD)
        d = tl.arange(0, 2 * HALF_PAD)
        vmask = (h < HKV)[:, None] & (d < 2 * HALF)[None, :]
        v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=vmask)
        tl.store(VC + slot * stride_vc_slot + h[:, None] * stride_vc_h + d[None, :], v.to(VC.dtype.element_ty),
                 mask=vmask)


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, return_k: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [T, Hq, D], k/v [T, Hkv, D] -> (rotated q, rotated k); rotated k and v are written to the
    cache at slot_mapping (slot = block * block_size + offset; negative = skip). With
    return_k=False the rotated k only goes to the cache (the serving path: one write saved)."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"q must be [T, Hq, D] and k/v [T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    t, hq, d = q.shape
    _, hkv, _ = k.shape
    if k.shape[0] != t or k.shape[2] != d or d % 2:
        raise ValueError(f"k must be [{t}, Hkv, {d}] with an even head_dim, got {tuple(k.shape)}")
    if cos.dim() != 2 or cos.shape[1] != d or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [max_positions, {d}] tables, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != (hkv, d):
        raise ValueError(f"k_cache/v_cache must be [num_blocks, block_size, {hkv}, {d}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if positions.shape != (t,) or slot_mapping.shape != (t,):
        raise ValueError(f"positions and slot_mapping must be [{t}], got {tuple(positions.shape)} and "
                         f"{tuple(slot_mapping.shape)}")
    if positions.dtype.is_floating_point or slot_mapping.dtype.is_floating_point:
        raise ValueError("positions and slot_mapping must be integer tensors")
    for name, x in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("k_cache/v_cache must be contiguous (slots are flat indices)")
    q_out = torch.empty_like(q)
    k_out = torch.empty_like(k) if return_k else None
    if t == 0:
        return q_out, k_out
    kc = k_cache.view(-1, hkv, d)
    vc = v_cache.view(-1, hkv, d)
    half = d // 2
    _rope_store_kernel[(t,)](
        q, k, v, positions, cos, sin, kc, vc, slot_mapping, q_out, k_out if return_k else q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
        q_out.stride(0), q_out.stride(1), *(k_out.stride()[:2] if return_k else (0, 0)),
        HQ=hq, HQ_PAD=triton.next_power_of_2(hq), HKV=hkv, HKV_PAD=triton.next_power_of_2(hkv),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), STORE_K_OUT=return_k, num_warps=4,
    )
    return q_out, k_out


def rope_and_store_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, return_k: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    c = cos[positions.long()].float()[:, None, :]
    s = sin[positions.long()].float()[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return (x.float() * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)

    q_rot, k_rot = rotate(q), rotate(k)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k.shape[1:])[slots] = k_rot[keep].to(k_cache.dtype)
    v_cache.view(-1, *v.shape[1:])[slots] = v[keep].to(v_cache.dtype)
    return q_rot, k_rot if return_k else None
