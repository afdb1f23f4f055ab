"""Fixed-size KV blocks with reference counts and a free list.

A block's count is the number of holders: each sequence whose block table lists it, plus one
if the radix tree keeps it as a node. A block is free exactly when its count is zero. The pool
knows nothing of tokens or models; it only hands out block ids of the paged KV cache.

num_filled[b] counts the leading slots of block b that hold committed KV: written by a step that
completed (or copied there by a copy-on-write that such a step applied). It restarts at 0 when
the block is handed out again. The scheduler's check() uses it to prove that every cached or
running token's KV was really computed: a failed step never commits, so a block it reserved
reads as unfilled (see engine.py, "Failed steps").
"""
from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    """The pool has no free block; the scheduler answers by evicting or preempting."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.num_filled = [0] * num_blocks
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("no free KV block")
        b = self._free.popleft()
        assert self.ref_counts[b] == 0, f"free block {b} has ref count {self.ref_counts[b]}"
        self.ref_counts[b] = 1
        self.num_filled[b] = 0
        self.peak_used = max(self.peak_used, self.num_used)
        return b

    def incref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise AssertionError(f"incref of free block {block}")
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise AssertionError(f"double free of block {block}")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)

    def fill(self, block: int, num_slots: int) -> None:
        """A completed step committed KV to the block's first num_slots slots."""
        if num_slots > self.num_filled[block]:
            self.num_filled[block] = num_slots

    def check(self) -> None:
        """Debug invariant check: counts non-negative, free list exactly the zero-count blocks, no duplicates."""
        free = list(self._free)
        assert len(free) == len(set(free)), "a block is on the free list twice"
        assert all(c >= 0 for c in self.ref_counts), "negative ref count"
        zero = {b for b, c in enumerate(self.ref_counts) if c == 0}
        assert zero == set(free), f"free list and zero-count blocks differ: {sorted(zero ^ set(free))[:10]}"
