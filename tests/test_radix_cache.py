"""The radix tree of KV blocks: block-level keys, token-level matching (ending inside a block),
in-flight marking, partial tails, LRU eviction of blocks no sequence holds."""
from __future__ import annotations

from rrm_engine.cache.block_pool import BlockPool
from rrm_engine.cache.radix_cache import RadixCache

BS = 4


def fill(tree: RadixCache, tokens: list[int]) -> list[int]:
    """Insert tokens' full blocks as a sequence would (blocks held by the caller too)."""
    node, blocks = tree.root, []
    for i in range(len(tokens) // BS):
        b = tree.pool.allocate()
        node = tree.insert_full(node, tuple(tokens[i * BS:(i + 1) * BS]), b)
        blocks.append(b)
    return blocks


def test_match_walks_blocks_then_ends_inside_one():
    tree = RadixCache(BlockPool(16, BS))
    seq = list(range(100, 112))
    blocks = fill(tree, seq)
    m = tree.match(seq, len(seq))
    assert m.in_flight  # inserted but the step that computes them has not run
    tree.mark_computed()
    m = tree.match(seq + [1, 2], 14)
    assert (m.blocks, m.num_tokens, m.in_flight) == (blocks, 12, False)
    # token-level: diverging inside the third block shares its first two tokens (copy on write)
    m = tree.match(seq[:10] + [7, 7, 7], 13)
    assert (m.blocks, m.num_tokens) == (blocks, 10)
    # at most max_tokens: the last token is never matched, so its logits get computed
    m = tree.match(seq, 11)
    assert (m.blocks, m.num_tokens) == (blocks, 11)
    assert tree.match([1, 2, 3], 3).num_tokens == 0
    tree.check()


def test_partial_tail_is_kept_and_superseded():
    pool = BlockPool(8, BS)
    tree = RadixCache(pool)
    [b0] = fill(tree, [1, 2, 3, 4])
    tree.mark_computed()
    node = tree.root.children[(1, 2, 3, 4)]
    tail = pool.allocate()
    tree.insert_partial(node, (5, 6), tail)
    m = tree.match([1, 2, 3, 4, 5, 6, 9], 7)
    assert (m.blocks, m.num_tokens) == ([b0, tail], 6)
    # a full block that extends the tail replaces it
    full = pool.allocate()
    tree.insert_full(node, (5, 6, 7, 8), full)
    assert list(node.children) == [(5, 6, 7, 8)]
    assert pool.ref_counts[tail] == 1  # only the sequence's own reference is left
    tree.check()


def test_eviction_is_lru_over_unreferenced_leaves():
    pool = BlockPool(6, BS)
    tree = RadixCache(pool)
    a = fill(tree, [1] * 8)  # chain of two blocks
    b = fill(tree, [2] * 4)
    tree.mark_computed()
    for x in a + b:
        pool.decref(x)  # sequences finished: only the tree holds them
    tree.match([1] * 8, 8)  # touch chain a: b is now least recently used
    assert tree.num_evictable() == 3
    assert tree.evict(1) == 1 and pool.ref_counts[b[0]] == 0
    pool.incref(a[1])  # a sequence holds the leaf of chain a: nothing there is evictable
    assert tree.evict(5) == 0
    pool.decref(a[1])
    assert tree.evict(5) == 2 and pool.num_free == 6 and tree.num_nodes == 0
    tree.check()
    pool.check()


def test_reset_drops_everything():
    pool = BlockPool(4, BS)
    tree = RadixCache(pool)
    blocks = fill(tree, list(range(8)))
    for x in blocks:
        pool.decref(x)
    tree.reset()
    assert pool.num_free == 4 and tree.num_nodes == 0
    tree.check()
