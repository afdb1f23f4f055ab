import pytest
import torch

from rrm_kernels.rope_store import rope_and_store, rope_and_store_ref
from rrm_engine.layers.rotary import apply_rotary, rotary_cos_sin


def random_step(t, hq, hkv, d, dtype, gen):
    q = torch.randn(t, hq, d, generator=gen).to(dtype)
    k = torch.randn(t, hkv, d, generator=gen).to(dtype)
    v = torch.randn(t, hkv, d, generator=gen).to(dtype)
    positions = torch.randint(0, 100, (t,), generator=gen)
    slots = torch.randperm(4 * 8, generator=gen)[:t]
    slots[1] = -1  # a padding row: rotated, not stored
    return q, k, v, positions, slots


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("hq,hkv,d", [(2, 2, 16), (4, 1, 64), (7, 1, 128)])
def test_rope_and_store_matches_reference(dtype, atol, hq, hkv, d):
    gen = torch.Generator().manual_seed(hq * 100 + d)
    q, k, v, positions, slots = random_step(5, hq, hkv, d, dtype, gen)
    cos, sin = rotary_cos_sin(torch.arange(100), d, 10000.0, dtype)
    caches = [torch.randn(4, 8, hkv, d, generator=gen).to(dtype) for _ in range(2)]
    kc, vc = caches[0].clone(), caches[1].clone()
    kc_ref, vc_ref = caches[0].clone(), caches[1].clone()
    q_rot, k_rot = rope_and_store(q, k, v, positions, cos, sin, kc, vc, slots)
    q_ref, k_ref = rope_and_store_ref(q, k, v, positions, cos, sin, kc_ref, vc_ref, slots)
    torch.testing.assert_close(q_rot, q_ref, atol=atol, rtol=0)
    torch.testing.assert_close(k_rot, k_ref, atol=atol, rtol=0)
    torch.testing.assert_close(kc, kc_ref, atol=atol, rtol=0)  # includes the untouched slots
    torch.testing.assert_close(vc, vc_ref, atol=0, rtol=0)
    stored = kc.view(-1, hkv, d)[slots[slots >= 0]]
    torch.testing.assert_close(stored, k_rot[slots >= 0], atol=0, rtol=0)


def test_rope_matches_the_decoder_rotary():
    gen = torch.Generator().manual_seed(1)
    q, k, v, positions, slots = random_step(6, 4, 2, 32, torch.float32, gen)
    cos, sin = rotary_cos_sin(torch.arange(100), 32, 1e6, torch.float32)
    kc, vc = torch.zeros(4, 8, 2, 32), torch.zeros(4, 8, 2, 32)
    q_rot, k_rot = rope_and_store(q, k, v, positions, cos, sin, kc, vc, slots)
    c, s = rotary_cos_sin(positions, 32, 1e6, torch.float32)
    torch.testing.assert_close(q_rot, apply_rotary(q, c, s), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_rot, apply_rotary(k, c, s), atol=1e-5, rtol=1e-5)


def test_rope_and_store_rejects_bad_input():
    gen = torch.Generator().manual_seed(2)
    q, k, v, positions, slots = random_step(3, 2, 1, 16, torch.float32, gen)
    cos, sin = rotary_cos_sin(torch.arange(10), 16, 1e4, torch.float32)
    kc = torch.zeros(4, 8, 1, 16)
    with pytest.raises(ValueError, match="cos/sin"):
        rope_and_store(q, k, v, positions, cos[:, :8], sin[:, :8], kc, kc.clone(), slots)
    with pytest.raises(ValueError, match="k_cache"):
        rope_and_store(q, k, v, positions, cos, sin, torch.zeros(4, 8, 2, 16), torch.zeros(4, 8, 2, 16), slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_and_store(q, k, v, positions, cos, sin, kc, kc.clone(), slots[:2])
    with pytest.raises(ValueError, match="integer"):
        rope_and_store(q, k, v, positions.float(), cos, sin, kc, kc.clone(), slots)


def test_rope_and_store_without_k_out_writes_the_same_cache():
    gen = torch.Generator().manual_seed(3)
    q, k, v, positions, slots = random_step(5, 4, 2, 32, torch.float16, gen)
    cos, sin = rotary_cos_sin(torch.arange(100), 32, 1e4, torch.float16)
    caches = [torch.zeros(4, 8, 2, 32, dtype=torch.float16) for _ in range(4)]
    q_a, k_a = rope_and_store(q, k, v, positions, cos, sin, caches[0], caches[1], slots)
    q_b, k_b = rope_and_store(q, k, v, positions, cos, sin, caches[2], caches[3], slots, return_k=False)
    assert k_b is None
    torch.testing.assert_close(q_b, q_a, atol=0, rtol=0)
    torch.testing.assert_close(caches[2], caches[0], atol=0, rtol=0)
    torch.testing.assert_close(caches[3], caches[1], atol=0, rtol=0)
