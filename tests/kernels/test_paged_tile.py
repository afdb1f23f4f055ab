"""The shared paged tile step (rrm_kernels/paged_tile.py) on its own: a test kernel folds every tile
of one paged context into the online-softmax state and returns the raw state (m, l, acc), which
is compared with the same quantities computed in float64 torch. The attention kernels' own tests
check the step inside each kernel; this one pins its contract, including rows that see no key
of a tile (m stays -inf, l and acc stay 0, no NaN) and MASKED=False ignoring `visible`."""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from rrm_kernels.paged_tile import load_kv_tile, online_softmax_update
from paged_data import make_cache, scattered_tables

ROWS, D, PAGE, BLOCK_N, HKV = 16, 16, 8, 16, 2
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


@triton.jit
def _fold_tiles_kernel(Q, K, V, BT, VIS, M, L, ACC, n_keys, hk, scale_log2,
                       stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                       ROWS: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                       MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    r = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    dmask = d < D
    q = tl.load(Q + r[:, None] * D + d[None, :])
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for n0 in range(0, n_keys, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < n_keys
        k, v = load_kv_tile(K, V, BT, offs, valid, hk, d, dmask,
                            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, PAGE)
        visible = tl.load(VIS + r[:, None] * n_keys + offs[None, :], mask=valid[None, :], other=0) != 0
        m_i, l_i, acc = online_softmax_update(q, k, v, visible, m_i, l_i, acc, scale_log2, MASKED, DOT_PRECISION)
    tl.store(M + r, m_i)
    tl.store(L + r, l_i)
    tl.store(ACC + r[:, None] * D + d[None, :], acc)


def _fold(q, kc, vc, bt, visible, n_keys, hk, scale_log2, masked):
    m = torch.empty(ROWS)
    l = torch.empty(ROWS)
    acc = torch.empty(ROWS, D)
    _fold_tiles_kernel[(1,)](
        q, kc, vc, bt, visible.to(torch.int8).contiguous(), m, l, acc, n_keys, hk, scale_log2,
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        ROWS=ROWS, D=D, PAGE=PAGE, BLOCK_N=BLOCK_N, MASKED=masked,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return m, l, acc


def _fold_ref(q, kc, vc, bt, visible, n_keys, hk, scale_log2):
    """Base-2 softmax state over the visible keys: m = max score, l = sum 2^(s - m), acc = sum 2^(s - m) v."""
    idx = torch.arange(n_keys)
    blocks = bt.long()[idx // PAGE]
    k = kc[blocks, idx % PAGE, hk].double()
    v = vc[blocks, idx % PAGE, hk].double()
    s = (q.double() @ k.T * scale_log2).masked_fill(~visible, float("-inf"))
    m = s.max(1).values
    p = torch.where(visible, torch.exp2(s - m.clamp(min=-1e30)[:, None]), 0.0)
    return m.float(), p.sum(1).float(), (p @ v).float()


def _data(dtype, n_keys, seed):
    gen = torch.Generator().manual_seed(seed)
    bt, nb = scattered_tables([n_keys], PAGE, gen)
    kc, vc = make_cache(nb, PAGE, HKV, D, dtype, gen)
    q = torch.randn(ROWS, D, generator=gen).to(dtype)
    visible = torch.rand(ROWS, n_keys, generator=gen) < 0.6
    return q, kc, vc, bt[0], visible


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_fold_matches_reference_with_empty_rows(dtype):
    n_keys = 37  # three tiles spanning five scattered pages, the last tile partial
    q, kc, vc, bt, visible = _data(dtype, n_keys, seed=7)
    visible[0] = False               # a row that never sees a key
    visible[1] = False
    visible[1, n_keys - 1] = True    # a row that sees nothing until the last key of the last tile
    visible[2] = True                # a row that sees everything
    scale_log2 = D ** -0.5 * math.log2(math.e)
    m, l, acc = _fold(q, kc, vc, bt, visible, n_keys, 1, scale_log2, masked=True)
    rm, rl, racc = _fold_ref(q, kc, vc, bt, visible, n_keys, 1, scale_log2)
    assert not (m.isnan().any() or l.isnan().any() or acc.isnan().any())
    assert m[0] == float("-inf") and l[0] == 0 and (acc[0] == 0).all()
    torch.testing.assert_close(m, rm, **TOL[dtype])
    torch.testing.assert_close(l, rl, **TOL[dtype])
    torch.testing.assert_close(acc, racc, **TOL[dtype])


def test_unmasked_fold_ignores_visible():
    n_keys = 2 * BLOCK_N  # MASKED=False is for whole tiles every row sees in full
    q, kc, vc, bt, visible = _data(torch.float32, n_keys, seed=8)
    scale_log2 = 0.3
    m, l, acc = _fold(q, kc, vc, bt, visible, n_keys, 0, scale_log2, masked=False)
    everything = torch.ones_like(visible)
    rm, rl, racc = _fold_ref(q, kc, vc, bt, everything, n_keys, 0, scale_log2)
    torch.testing.assert_close(m, rm, **TOL[torch.float32])
    torch.testing.assert_close(l, rl, **TOL[torch.float32])
    torch.testing.assert_close(acc, racc, **TOL[torch.float32])
