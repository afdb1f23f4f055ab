"""Turns a Schedule into the decoder's tensors (attention.py's AttentionMetadata), runs the
decoder, and returns the logits of the rows that sample.

Only rows that sample reach the LM head: the last token of each sequence whose (chunked)
prefill completes this step and every decode row. Rows with one new token (decodes) are packed
first, so that a step mixing chunked prefill with decode hands its decode rows to the decode
kernels (split-K, cascade) and the rest to prefill (AttentionMetadata.num_decode).

The decode rows also carry a prefix tree of the blocks they share, as nested levels for the
shared-prefix (cascade) kernels: with RRM prompts, level 0 = the system prompt every row shares,
level 1 = one query's prompt shared by all its comparisons, level 2 = one comparison's prompt
shared by its k votes (a level holds only groups of >= 2 rows, so with one query in flight the
system prompt and the query form one level). A backend that ignores the levels stays exact
because block_tables are always complete.

With a StaticDecode (decode_graphs.py, switched on by cuda_graphs=True) pure decode steps run
through padded static buffers and, on CUDA, replayed graphs, with the same split-K and prefix
levels (the plan is written into static buffers the graphs read).
"""
from __future__ import annotations

import torch

from rrm_kernels.decode_plan import MAX_LEVELS, HostLevel

from ..layers.attention import AttentionMetadata, KVCache, PrefixLevel
from .cuda_graphs import StaticDecode
from ..model.decoder import Decoder
from .scheduler import Schedule


class ModelRunner:
    def __init__(self, model: Decoder, cache: KVCache, static_decode: StaticDecode | None = None, pad_block: int = 0,
                 max_prefix_levels: int = MAX_LEVELS):
        self.model = model
        self.static_decode = static_decode
        self.cache = cache
        self.block_size = cache.block_size
        self.device = cache.k.device
        # block id that pads short block-table rows: the engine's scratch block, owned by no
        # sequence, so a backend's masked reads past a row's end never touch another's KV
        self.pad_block = pad_block
        self.max_prefix_levels = max_prefix_levels

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (all layers) before this step writes into them."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], dtype=torch.int64, device=self.device)
        dst = torch.tensor([d for _, d in copies], dtype=torch.int64, device=self.device)
        self.cache.k[:, dst] = self.cache.k[:, src]
        self.cache.v[:, dst] = self.cache.v[:, src]

    def build(self, schedule: Schedule) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """input_ids [T], metadata, and for each scheduled sequence (in schedule order) its
        sampling row (-1: none). Sequences with one new token are packed first."""
        bs, dev = self.block_size, self.device
        order = ([i for i, s in enumerate(schedule.seqs) if s.num_new == 1]
                 + [i for i, s in enumerate(schedule.seqs) if s.num_new != 1])
        seqs = [schedule.seqs[i] for i in order]
        ids: list[int] = []
        starts, q_lens, seq_lens, packed_rows = [], [], [], []
        for s in seqs:
            start = s.seq.num_computed
            ids.extend(s.seq.tokens[start:start + s.num_new])
            starts.append(start)
            q_lens.append(s.num_new)
            seq_lens.append(start + s.num_new)
            packed_rows.append(len(ids) - 1 if s.samples else -1)
        rows = [0] * len(order)
        for packed, i in enumerate(order):
            rows[i] = packed_rows[packed]
        max_blocks = max(-(-n // bs) for n in seq_lens)
        padded = []
        for s, n in zip(seqs, seq_lens):
            nb = -(-n // bs)
            padded.append(s.seq.block_table[:nb] + [self.pad_block] * (max_blocks - nb))
        table = torch.tensor(padded, dtype=torch.int32)
        q_lens_t = torch.tensor(q_lens, dtype=torch.int64)
        qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        torch.cumsum(q_lens_t, 0, out=qsl[1:])
        # token t of sequence b sits at position starts[b] + (t - qsl[b])
        seq_of_token = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens_t)
        positions = torch.arange(len(ids)) - qsl[:-1].long()[seq_of_token] + torch.tensor(starts)[seq_of_token]
        slots = table[seq_of_token, positions // bs].long() * bs + positions % bs
        meta = AttentionMetadata(
            positions=positions.to(dev, non_blocking=True),
            slot_mapping=slots.to(dev, non_blocking=True),
            query_start_loc=qsl.to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=table.to(dev, non_blocking=True),
            query_lens_host=q_lens,
            seq_lens_host=seq_lens,
        )
        nd = meta.num_decode
        if nd > 1:
            tables = [s.seq.block_table for s in seqs[:nd]]
            limits = [(n - 1) // bs for n in seq_lens[:nd]]  # blocks strictly before each row's new token
            meta.prefix_levels = [PrefixLevel.from_host(h, dev, self.pad_block)
                                  for h in prefix_tree(tables, limits, bs, self.max_prefix_levels)]
        input_ids = torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True)
        return input_ids, meta, rows

    def _static(self, meta: AttentionMetadata) -> bool:
        return (self.static_decode is not None and meta.is_decode
                and self.static_decode.can_run(len(meta.query_lens_host)))

    @torch.inference_mode()
    def run(self, schedule: Schedule) -> tuple[torch.Tensor, list[int]]:
        """Returns logits [R, V] (fp32) of the sampling rows and, per scheduled sequence, its
        index into them (-1 when it does not sample this step)."""
        self.copy_blocks(schedule.copies)
        input_ids, meta, rows = self.build(schedule)
        if self._static(meta):  # every decode row samples, in packed order
            return self.static_decode.run(input_ids, meta).float(), rows
        hidden = self.model(input_ids, meta.positions, self.cache, meta)
        sample_rows = sorted(r for r in rows if r >= 0)
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, dtype=torch.int64, device=self.device)])
        where = {r: k for k, r in enumerate(sample_rows)}
        return logits.float(), [where[r] if r >= 0 else -1 for r in rows]


def prefix_tree(tables: list[list[int]], limits: list[int], block_size: int,
                max_levels: int = MAX_LEVELS) -> list[HostLevel]:
    """Nested levels of the blocks that rows share, as a tree: a group is a maximal run of blocks
    [start, end) held by the same >= 2 rows, which all share [0, start) too; its children split
    the group at `end` by the block each row holds there. Level i holds the groups at depth i
    (a row's level-i segment starts where its level i-1 segment ends). limits[r]: blocks row r
    may share (those strictly before its new token). Groups deeper than max_levels are left out:
    the rows read those blocks in their own suffix pass."""
    groups: list[list[tuple[list[int], int, int]]] = []

    def walk(rows: list[int], start: int, depth: int) -> None:
        end = _common_run(tables, rows, start, min(limits[r] for r in rows))
        if end > start:
            if depth == max_levels:
                return
            if len(groups) == depth:
                groups.append([])
            groups[depth].append((rows, start, end))
            depth += 1
        children: dict[int, list[int]] = {}
        for r in rows:
            if limits[r] > end:
                children.setdefault(tables[r][end], []).append(r)
        for sub in children.values():
            if len(sub) > 1:
                walk(sub, end, depth)

    roots = [r for r in range(len(tables)) if limits[r] > 0]
    if len(roots) > 1:
        walk(roots, 0, 0)
    levels = []
    for level in groups:
        seq_group = [-1] * len(tables)
        for g, (rows, _, _) in enumerate(level):
            for r in rows:
                seq_group[r] = g
        bs_tables = [tables[rows[0]][start:end] for rows, start, end in level]
        levels.append(HostLevel(bs_tables, [(end - start) * block_size for _, start, end in level], seq_group))
    return levels


def _common_run(tables: list[list[int]], rows: list[int], start: int, limit: int) -> int:
    """The largest end <= limit such that every row holds the same blocks in [start, end)."""
    first = tables[rows[0]]
    end = limit
    for r in rows[1:]:
        t = tables[r]
        if t[start:end] == first[start:end]:  # list slices compare in C
            continue
        lo, hi = start, end  # t matches first on [start, lo) and differs somewhere in [lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if t[start:mid] == first[start:mid]:
                lo = mid
            else:
                hi = mid
        end = lo
    return end
