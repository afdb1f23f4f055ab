"""The block pool: ref counts, free list, and its debug invariant check."""
from __future__ import annotations

import pytest

from rrm_engine.cache.block_pool import BlockPool, OutOfBlocks


def test_allocate_share_and_free():
    pool = BlockPool(3, 16)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert sorted((a, b, c)) == [0, 1, 2] and pool.num_free == 0 and pool.peak_used == 3
    with pytest.raises(OutOfBlocks):
        pool.allocate()
    pool.incref(a)
    pool.decref(a)
    assert pool.num_free == 0  # still held once
    pool.decref(a)
    assert pool.num_free == 1 and pool.allocate() == a
    pool.check()


def test_double_free_and_stale_incref_are_caught():
    pool = BlockPool(2, 4)
    a = pool.allocate()
    pool.decref(a)
    with pytest.raises(AssertionError, match="double free"):
        pool.decref(a)
    with pytest.raises(AssertionError, match="free block"):
        pool.incref(a)
    pool.check()


def test_check_detects_corruption():
    pool = BlockPool(2, 4)
    pool.allocate()
    pool.ref_counts[1] = 1  # a block counted as held while on the free list
    with pytest.raises(AssertionError):
        pool.check()


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 16)
