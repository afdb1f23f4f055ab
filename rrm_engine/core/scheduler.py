"""Continuous batching: which sequences run this step, with how many new tokens, in which blocks.

Every step packs, under max_num_batched_tokens and max_num_seqs:
  1. running sequences, oldest request first: one token for a decode, the next chunk for a
     prefill that did not fit in earlier steps (chunked prefill);
  2. then waiting sequences, oldest first: the prompt is matched against the radix tree, only
     the unmatched tail is allocated and computed (chunked when the budget ends).
Blocks are reserved before the step: a write into a shared block (a fork's partial last block,
a block matched from the tree) first copies it (copy-on-write; the copies are returned for the
runner to apply). When the pool runs dry the tree's unused blocks are evicted; if that is not
enough the newest running sequence is preempted by recompute: its blocks are released, it goes
back to the waiting queue with its generated tokens kept, and later recomputes (mostly from the
tree). Nothing is admitted in a step that preempted, so a request is never lost or starved.

While a step is built and until step_done(), `current` is its Schedule, whose `in_hand` names the
sequence the scheduler was changing: if anything raises, the engine knows which sequences the step
touched and drops them (drop(); see engine.py, "Failed steps").
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ..cache.block_pool import BlockPool, OutOfBlocks
from ..cache.radix_cache import RadixCache
from .sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens fed this step: seq.tokens[seq.num_computed : seq.num_computed + num_new]

    @property
    def samples(self) -> bool:
        """The step computes the sequence's last token, so a new token is sampled for it."""
        return self.seq.num_computed + self.num_new == len(self.seq.tokens)


@dataclass
class Schedule:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src block, dst block), applied before the step
    num_preempted: int = 0
    cached_tokens: int = 0  # prompt tokens matched in the tree by sequences admitted this step
    num_deferred: int = 0  # waiting sequences held back behind a leader computing their prefix
    in_hand: Sequence | None = None  # the sequence being matched/reserved/preempted right now

    @property
    def touched(self) -> list[Sequence]:
        """Sequences whose blocks this step changed (or was changing when it raised)."""
        seqs = [s.seq for s in self.seqs]
        if self.in_hand is not None and all(s is not self.in_hand for s in seqs):
            seqs.append(self.in_hand)
        return seqs

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.seqs)


class Scheduler:
    def __init__(self, pool: BlockPool, tree: RadixCache | None, max_num_batched_tokens: int, max_num_seqs: int):
        self.pool, self.tree = pool, tree
        self.block_size = pool.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: list[Sequence] = []  # sorted by priority (preempted sequences keep theirs)
        self.running: list[Sequence] = []  # sorted by priority
        self.current: Schedule | None = None  # the step being built or run (None between steps)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.priority)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling: it already holds (shared) blocks."""
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.priority)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        out = self.current = Schedule()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0 and len(out.seqs) < self.max_num_seqs:
            seq = out.in_hand = self.running[i]
            want = min(len(seq.tokens) - seq.num_computed, budget)
            got = self._reserve(seq, want, out.copies)
            while got == 0:
                victim = out.in_hand = self.running[-1]
                self.preempt(victim)
                out.in_hand = seq
                out.num_preempted += 1
                if victim is seq:
                    break
                got = self._reserve(seq, want, out.copies)
            if got == 0:
                continue  # seq itself was preempted; running[i] is now the next one
            out.seqs.append(ScheduledSeq(seq, got))
            self._insert_scheduled(seq, got)
            out.in_hand = None
            budget -= got
            i += 1
        out.in_hand = None
        if out.num_preempted:
            return out
        j = 0
        while j < len(self.waiting) and budget > 0 and len(out.seqs) < self.max_num_seqs:
            seq = out.in_hand = self.waiting[j]
            cached = self._match(seq)
            if cached is None:
                out.num_deferred += 1
                out.in_hand = None
                j += 1
                continue
            want = min(len(seq.tokens) - seq.num_computed, budget)
            got = self._reserve(seq, want, out.copies)
            if got == 0:
                self.release(seq)
                out.in_hand = None
                break  # the pool is full: admit nothing more this step
            self.waiting.pop(j)
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.priority)
            out.seqs.append(ScheduledSeq(seq, got))
            out.cached_tokens += cached
            if seq.num_generated == 0:
                seq.request.num_cached_tokens = cached
            self._insert_scheduled(seq, got)
            out.in_hand = None
            budget -= got
        return out

    def step_done(self, schedule: Schedule) -> None:
        """The step ran: its tokens' KV is in the cache (and its copy-on-write copies applied)."""
        bs, filled = self.block_size, self.pool.num_filled
        for s in schedule.seqs:
            seq = s.seq
            start, end = seq.num_computed, seq.num_computed + s.num_new
            for j in range(start // bs, (end - 1) // bs + 1):  # usually one block (BlockPool.fill, inlined)
                b, n = seq.block_table[j], min(bs, end - j * bs)
                if n > filled[b]:
                    filled[b] = n
            seq.num_computed = end
        if self.tree is not None:
            self.tree.mark_computed()
        self.current = None

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release(seq)
        seq.prefill_done = False  # its tokens are recomputed as a prompt
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.release(seq)
        seq.status = Status.FINISHED

    def drop(self, seq: Sequence) -> None:
        """Take a sequence of a failed step out of the queues and give back its blocks without
        keeping its tail in the tree: its last block may be a copy-on-write target that was never
        copied, or half-written. Tolerates a sequence the failed step left between states."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        table, seq.block_table = seq.block_table, []
        for b in table:
            self.pool.decref(b)
        seq.num_computed = 0
        seq.tree_node = None
        seq.num_tree_blocks = 0
        seq.status = Status.FINISHED

    def release(self, seq: Sequence) -> None:
        """Give back the sequence's blocks; its computed partial last block stays in the tree so
        the sequence can be continued (or recomputed after preemption) without recomputing it."""
        bs, n = self.block_size, seq.num_computed
        full = n // bs
        node = seq.tree_node
        if (self.tree is not None and node is not None and not node.evicted and seq.num_tree_blocks == full
                and n % bs and full < len(seq.block_table)):
            self.tree.insert_partial(node, tuple(seq.tokens[full * bs:n]), seq.block_table[full])
        for b in seq.block_table:
            self.pool.decref(b)
        seq.block_table = []
        seq.num_computed = 0
        seq.tree_node = None
        seq.num_tree_blocks = 0

    def _match(self, seq: Sequence) -> int | None:
        """Share the cached prefix of a waiting sequence; None when it must wait for a leader."""
        if self.tree is None:
            seq.tree_node = None
            return 0
        # at least the last token is computed: its logits are needed
        m = self.tree.match(seq.tokens, len(seq.tokens) - 1)
        if m.in_flight:
            return None
        for b in m.blocks:
            self.pool.incref(b)
        seq.block_table = list(m.blocks)
        seq.num_computed = m.num_tokens
        seq.tree_node = m.last_full
        seq.num_tree_blocks = m.num_tokens // self.block_size
        return m.num_tokens

    def _reserve(self, seq: Sequence, want: int, copies: list[tuple[int, int]]) -> int:
        """Make blocks writable for up to `want` new tokens; returns how many tokens fit."""
        bs, table, start = self.block_size, seq.block_table, seq.num_computed
        need = -(-(start + want) // bs) - len(table)
        shared_tail = start % bs != 0 and self.pool.ref_counts[table[start // bs]] > 1
        self._make_room(need + shared_tail)
        if shared_tail:
            dst = self._allocate()
            if dst is None:
                return 0
            src = table[start // bs]
            table[start // bs] = dst  # the table owns dst before src is let go: no window to leak or double free
            copies.append((src, dst))
            self.pool.decref(src)
        for _ in range(need):
            b = self._allocate()
            if b is None:
                break
            table.append(b)
        return max(0, min(want, len(table) * bs - start))

    def _make_room(self, n: int) -> None:
        short = n - self.pool.num_free
        if short > 0 and self.tree is not None:
            # each eviction scans the tree: free ~3% of the pool at once rather than one block per call
            self.tree.evict(max(short, self.pool.num_blocks // 32))

    def _allocate(self) -> int | None:
        try:
            return self.pool.allocate()
        except OutOfBlocks:
            return None

    def _insert_scheduled(self, seq: Sequence, num_new: int) -> None:
        """Put the blocks this step fills into the tree now (in flight), so a follower scheduled
        in the same step sees them and waits instead of computing them again."""
        if self.tree is None:
            return
        bs, end = self.block_size, seq.num_computed + num_new
        while seq.tree_node is not None and seq.num_tree_blocks < end // bs:
            j = seq.num_tree_blocks
            seq.tree_node = self.tree.insert_full(seq.tree_node, tuple(seq.tokens[j * bs:(j + 1) * bs]), seq.block_table[j])
            seq.num_tree_blocks = j + 1

    def check(self) -> None:
        """Debug invariants between steps: ref counts equal holders (sequences + tree), no leak,
        no double free; nothing in flight; every token a running sequence or a tree node counts as
        computed sits in a block slot that a completed step filled (pool.num_filled)."""
        assert self.current is None, "check() during a step (or after a failed one that was not rolled back)"
        bs, filled = self.block_size, self.pool.num_filled
        counts = [0] * self.pool.num_blocks
        for seq in self.running:
            assert seq.status is Status.RUNNING
            for b in seq.block_table:
                counts[b] += 1
            assert len(seq.block_table) * bs >= seq.num_computed, f"sequence {seq.seq_id} computed beyond its blocks"
            for j in range(-(-seq.num_computed // bs)):
                need = min(bs, seq.num_computed - j * bs)
                assert filled[seq.block_table[j]] >= need, (
                    f"sequence {seq.seq_id} counts {need} computed tokens in its block {j} "
                    f"(id {seq.block_table[j]}) but only {filled[seq.block_table[j]]} slots hold committed KV")
        for seq in self.waiting:
            assert not seq.block_table, "a waiting sequence holds blocks"
        if self.tree is not None:
            self.tree.check(filled)
            for node in self.tree._nodes:
                counts[node.block] += 1
        self.pool.check()
        assert counts == self.pool.ref_counts, "block ref counts differ from their holders"
