"""Counter-based random numbers: u = uniform(seed, offset, token index), a pure function.

The sampler needs, for every (sample, vocabulary entry), a uniform draw that depends only on the
sample's seed, its step counter (offset) and the token index, so that a seeded sequence produces
the same tokens whatever batch it lands in and whichever row it occupies. A stateful generator
cannot give that; a hash of the counter can.

The hash is a 32-bit integer mixer (xor-shift / multiply rounds, multipliers below 2**31) written
twice with identical arithmetic: in torch int64 ops (values kept in [0, 2**32), so every product is
below 2**63 and never overflows) and in Triton uint32 ops (which wrap mod 2**32, giving the same
low 32 bits). The two therefore agree bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MASK32 = 0xFFFFFFFF
MUL_A = 0x7FEB352D  # odd multipliers < 2**31 (see module docstring for why below 2**31)
MUL_B = 0x5BD1E995
SALT_SEED = 0x3C6EF372
SALT_OFFSET = 0x1B873593
SALT_TOKEN = 0x68E31DA4
# u = (bits >> 9 + 0.5) * 2**-23: 23 random bits plus a half step is exact in fp32 and lies
# strictly inside (0, 1), so -log(-log(u)) is always finite.
U_SCALE = 2.0 ** -23
# The largest Gumbel noise -log(-log(u)) can reach: u <= 1 - 2**-24 gives 16.64; 17 leaves room
# for fp32 rounding. Used to prune tokens that cannot win the race.
GUMBEL_MAX = 17.0


def _mix_torch(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * MUL_A) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL_B) & MASK32
    return x ^ (x >> 16)


def row_keys_torch(seeds: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per sample from its int64 seed and offset (all 64 bits of each count)."""
    s, o = seeds.long(), offsets.long()
    h1 = _mix_torch((s & MASK32) ^ SALT_SEED)
    h1 = _mix_torch(h1 ^ ((s >> 32) & MASK32))
    h2 = _mix_torch(h1 ^ (o & MASK32) ^ SALT_OFFSET)
    h2 = _mix_torch(h2 ^ ((o >> 32) & MASK32))
    return h1, h2


def uniform_at_torch(seeds: torch.Tensor, offsets: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1) at token indices idx, broadcasting seeds/offsets against idx."""
    return uniform_from_keys_torch(*row_keys_torch(seeds, offsets), idx)


def uniform_from_keys_torch(h1: torch.Tensor, h2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """As uniform_at_torch, from row_keys_torch's keys (compute them once per row, then gather)."""
    bits = _mix_torch(((idx.long() ^ SALT_TOKEN) + h2) & MASK32)
    bits = _mix_torch(bits ^ h1)
    return ((bits >> 9).to(torch.float32) + 0.5) * U_SCALE


def uniform_torch(seeds: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 uniforms in (0, 1) for samples with these seeds/offsets."""
    j = torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :]
    return uniform_at_torch(seeds[:, None], offsets[:, None], j)


@triton.jit
def _mix_tl(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x5BD1E995
    return x ^ (x >> 16)


@triton.jit
def row_keys_tl(seed, offset):
    """seed, offset: int64 scalars -> (h1, h2) uint32 scalars, equal to row_keys_torch."""
    s_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    s_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    o_lo = (offset & 0xFFFFFFFF).to(tl.uint32)
    o_hi = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    h1 = _mix_tl(s_lo ^ 0x3C6EF372)
    h1 = _mix_tl(h1 ^ s_hi)
    h2 = _mix_tl(h1 ^ o_lo ^ 0x1B873593)
    h2 = _mix_tl(h2 ^ o_hi)
    return h1, h2


@triton.jit
def uniform_tl(h1, h2, idx):
    """idx: int32 token indices (>= 0) -> float32 uniforms in (0, 1), equal to uniform_torch."""
    bits = _mix_tl((idx.to(tl.uint32) ^ 0x68E31DA4) + h2)
    bits = _mix_tl(bits ^ h1)
    return ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
