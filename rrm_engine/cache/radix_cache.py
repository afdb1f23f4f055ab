"""A radix tree of KV blocks keyed by token ids: the prefix cache shared by all requests.

Each node below the root is one block of the paged KV cache and the tokens whose KV it holds:
  * a full node holds exactly block_size tokens and may have children;
  * a partial node holds fewer tokens (the tail of a finished sequence) and is always a leaf.
The tree holds one reference on each node's block (see block_pool.py). Matching is token-level:
it walks full nodes by exact block keys, then may end inside one more node (full or partial)
with the longest common prefix; the caller shares that block and copies it on its first write
(copy-on-write), so the matched tokens' KV is reused without recomputation.

Sharing inside one step. Blocks are inserted the moment they are scheduled for computation and
marked in flight until the step that computes them has run. A request whose match touches an
in-flight node is deferred by the scheduler to a later step (followers after the leader): then
every block of the common prefix, including the leader's partial block, is computed exactly once
and the follower copies what it needs. Sharing an in-flight full block inside the same forward
would also be exact (backends store this step's K/V before reading the cache), but the follower
would still recompute the tokens of the leader's partial block, so waiting one step is cheaper.

Finished sequences insert their partial last block as a partial node, so a caller that continues
a finished sequence (prompt + generated + extra) reuses all of its KV.

Eviction: least recently used leaves whose block no sequence holds (count 1, the tree's own).

A step that fails never marks its in-flight nodes computed: drop_in_flight() removes them (and
anything below them) so no later request can match KV that was never written.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from .block_pool import BlockPool


@dataclass(eq=False)
class Node:
    tokens: tuple[int, ...]
    block: int
    parent: "Node | None"
    children: dict[tuple[int, ...], "Node"] = field(default_factory=dict)
    last_access: int = 0
    computed: bool = True
    evicted: bool = False


@dataclass
class Match:
    blocks: list[int]  # full blocks, then possibly one block matched only in part (copy it on write)
    num_tokens: int  # tokens whose KV the blocks hold for this prompt
    last_full: Node  # deepest full node matched: where the sequence's next full block is inserted
    in_flight: bool  # the match touches a block that is still being computed this step


class RadixCache:
    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_size = pool.block_size
        self.root = Node((), -1, None)
        self._nodes: set[Node] = set()
        self._in_flight: list[Node] = []
        self._clock = itertools.count(1)

    @property
    def num_nodes(self) -> int:
        return len(self._nodes)

    def match(self, tokens: list[int], max_tokens: int) -> Match:
        """Longest cached prefix of tokens, at most max_tokens long."""
        bs, node, n, now = self.block_size, self.root, 0, next(self._clock)
        blocks: list[int] = []
        in_flight = False
        while n + bs <= max_tokens:
            child = node.children.get(tuple(tokens[n:n + bs]))
            if child is None or len(child.tokens) < bs:
                break
            node, n = child, n + bs
            node.last_access = now
            in_flight |= not node.computed
            blocks.append(node.block)
        last_full = node
        # the match may end inside one more block: pick the child with the longest common prefix
        rest = tokens[n:max_tokens]
        best, best_len = None, 0
        for child in node.children.values() if rest else ():
            m = _common_prefix_len(child.tokens, rest)
            if m > best_len:
                best, best_len = child, m
        if best is not None:
            best.last_access = now
            in_flight |= not best.computed
            blocks.append(best.block)
            n += best_len
        return Match(blocks, n, last_full, in_flight)

    def insert_full(self, parent: Node, tokens: tuple[int, ...], block: int) -> Node | None:
        """Add a full block under parent (a full node or the root); returns the node now holding
        these tokens (an existing one if already cached), or None if parent left the tree."""
        assert len(tokens) == self.block_size
        if parent.evicted:
            return None
        now = next(self._clock)
        node = parent.children.get(tokens)
        if node is not None:
            node.last_access = now
            return node
        # partial leaves that this block extends are now redundant
        for key, child in list(parent.children.items()):
            if len(child.tokens) < self.block_size and tokens[:len(child.tokens)] == child.tokens:
                self._remove(child)
        node = Node(tokens, block, parent, last_access=now, computed=False)
        self.pool.incref(block)
        parent.children[tokens] = node
        self._nodes.add(node)
        self._in_flight.append(node)
        return node

    def insert_partial(self, parent: Node, tokens: tuple[int, ...], block: int) -> None:
        """Keep the computed tail (fewer than block_size tokens) of a finished sequence."""
        assert 0 < len(tokens) < self.block_size
        if parent.evicted:
            return
        for child in list(parent.children.values()):
            if child.tokens[:len(tokens)] == tokens:
                return  # already covered by an equal or longer block
            if len(child.tokens) < len(tokens) and tokens[:len(child.tokens)] == child.tokens:
                self._remove(child)
        node = Node(tokens, block, parent, last_access=next(self._clock), computed=True)
        self.pool.incref(block)
        parent.children[tokens] = node
        self._nodes.add(node)

    def mark_computed(self) -> None:
        """Called after a step ran: every block inserted for it now holds its KV."""
        for node in self._in_flight:
            node.computed = True
        self._in_flight.clear()

    def drop_in_flight(self) -> int:
        """The step that inserted the in-flight nodes failed: remove them with their subtrees
        (KV below an unwritten block is garbage too). Returns the number of nodes removed."""
        removed = 0
        for node in reversed(self._in_flight):
            if not node.evicted:
                removed += self._remove_subtree(node)
        self._in_flight.clear()
        return removed

    def _remove_subtree(self, node: Node) -> int:
        removed = 0
        for child in list(node.children.values()):
            removed += self._remove_subtree(child)
        self._remove(node)
        return removed + 1

    def evict(self, num_blocks: int) -> int:
        """Free up to num_blocks blocks held only by the tree, least recently used leaves first."""
        ref = self.pool.ref_counts
        heap = [(n.last_access, id(n), n) for n in self._nodes if not n.children and ref[n.block] == 1]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_blocks:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self._remove(node)
            freed += 1
            if parent is not self.root and not parent.children and ref[parent.block] == 1:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def num_evictable(self) -> int:
        """Blocks that evict() could free now (a subtree is evictable when no sequence holds any of it)."""
        ref = self.pool.ref_counts

        def count(node: Node) -> tuple[int, bool]:
            total, all_free = 0, True
            for child in node.children.values():
                c, f = count(child)
                total += c
                all_free &= f
            if node is self.root:
                return total, all_free
            if all_free and ref[node.block] == 1:
                return total + 1, True
            return total, False

        return count(self.root)[0]

    def reset(self) -> None:
        """Drop every node (the weights changed: cached KV is stale)."""
        for node in list(self._nodes):
            node.evicted = True
            self.pool.decref(node.block)
        self._nodes.clear()
        self._in_flight.clear()
        self.root = Node((), -1, None)

    def _remove(self, node: Node) -> None:
        assert not node.children, "only leaves are removed"
        del node.parent.children[node.tokens]
        self._nodes.discard(node)
        node.evicted = True
        self.pool.decref(node.block)

    def check(self, num_filled: list[int] | None = None) -> None:
        """Debug invariants: every node reachable, its block alive, no block held by two nodes.
        With num_filled (the pool's, between steps): no node is in flight, every node is marked
        computed and its block holds committed KV for all of the node's tokens."""
        seen: set[Node] = set()
        stack = [self.root]
        while stack:
            node = stack.pop()
            for key, child in node.children.items():
                assert child.parent is node and key == child.tokens and not child.evicted
                assert len(node.tokens) == self.block_size or node is self.root, "a partial node has children"
                seen.add(child)
                stack.append(child)
        assert seen == self._nodes, "tree nodes and node registry differ"
        blocks = [n.block for n in self._nodes]
        assert len(blocks) == len(set(blocks)), "a block is held by two nodes"
        assert all(self.pool.ref_counts[b] >= 1 for b in blocks), "a node holds a freed block"
        if num_filled is not None:
            assert not self._in_flight, f"{len(self._in_flight)} tree nodes still in flight between steps"
            for n in self._nodes:
                assert n.computed, f"tree node of block {n.block} is not computed between steps"
                assert num_filled[n.block] >= len(n.tokens), (
                    f"tree node of block {n.block} claims {len(n.tokens)} tokens but only "
                    f"{num_filled[n.block]} slots hold committed KV")


def _common_prefix_len(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
