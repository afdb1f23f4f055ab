"""Turns a Schedule into the decoder's tensors (attention.py's AttentionMetadata), runs the
decoder, and returns the logits of the rows that sample.

Only rows that sample reach the LM head: the last token of each sequence whose (chunked)
prefill completes this step and every decode row. Decode batches also carry two levels of
shared prefixes (query prefix across requests, then each fork group's prompt) for the
shared-prefix kernels (Triton, and the torch backend's cascade path); a backend that ignores the
hint stays exact because block_tables are always complete.

With a StaticDecode (decode_graphs.py, switched on by cuda_graphs=True) pure decode steps run
through padded static buffers and, on CUDA, replayed graphs; that path skips the prefix levels.
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata, KVCache, PrefixLevel
from .decode_graphs import StaticDecode
from .model import Decoder
from .scheduler import Schedule


class ModelRunner:
    def __init__(self, model: Decoder, cache: KVCache, static_decode: StaticDecode | None = None, pad_block: int = 0):
        self.model = model
        # block id that pads short block-table rows: the engine's scratch block, owned by no
        # sequence, so a backend's masked reads past a row's end never touch another's KV
        self.pad_block = pad_block
        self.static_decode = static_decode
        self.cache = cache
        self.block_size = cache.block_size
        self.device = cache.k.device

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (all layers) before this step writes into them."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], dtype=torch.int64, device=self.device)
        dst = torch.tensor([d for _, d in copies], dtype=torch.int64, device=self.device)
        self.cache.k[:, dst] = self.cache.k[:, src]
        self.cache.v[:, dst] = self.cache.v[:, src]

    def build(self, schedule: Schedule) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """input_ids [T], metadata, and for each scheduled sequence its sampling row (-1: none)."""
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        starts, q_lens, seq_lens, rows = [], [], [], []
        for s in schedule.seqs:
            start = s.seq.num_computed
            ids.extend(s.seq.tokens[start:start + s.num_new])
            starts.append(start)
            q_lens.append(s.num_new)
            seq_lens.append(start + s.num_new)
            rows.append(len(ids) - 1 if s.samples else -1)
        max_blocks = max(-(-n // bs) for n in seq_lens)
        padded = []
        for s, n in zip(schedule.seqs, seq_lens):
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
        if meta.is_decode and not self._static(meta):
            meta.prefix_levels = self._prefix_levels(schedule, seq_lens)
        input_ids = torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True)
        return input_ids, meta, rows

    def _prefix_levels(self, schedule: Schedule, seq_lens: list[int]) -> list[PrefixLevel]:
        """Two nested levels of shared blocks among decode rows (whole blocks before each row's
        new token):
          level 0: rows whose tables start with the same block: their longest common run
                   (e.g. the system prompt + query shared by all comparisons of one query);
          level 1: inside a level-0 group that spans several requests, the rows of one request
                   (the k votes of one comparison) share their prompt's blocks beyond level 0.
        A cluster holding one request only gets its fork prefix at level 0 and no level 1."""
        bs = self.block_size
        tables = [s.seq.block_table for s in schedule.seqs]
        limits = [(n - 1) // bs for n in seq_lens]  # blocks strictly before the new token
        clusters: dict[int, list[int]] = {}
        for b, t in enumerate(tables):
            if limits[b] > 0:
                clusters.setdefault(t[0], []).append(b)
        level0: list[tuple[list[int], list[int]]] = []  # (members, blocks)
        level1: list[tuple[list[int], list[int]]] = []
        for members in clusters.values():
            if len(members) < 2:
                continue
            n0 = _common_run([tables[b] for b in members], min(limits[b] for b in members))
            level0.append((members, tables[members[0]][:n0]))
            by_request: dict[int, list[int]] = {}
            for b in members:
                by_request.setdefault(id(schedule.seqs[b].seq.request), []).append(b)
            if len(by_request) < 2:
                continue
            for group in by_request.values():
                if len(group) < 2:
                    continue
                n1 = _common_run([tables[b] for b in group], min(limits[b] for b in group))
                if n1 > n0:
                    level1.append((group, tables[group[0]][n0:n1]))
        return [self._level(groups, len(tables)) for groups in (level0, level1) if groups]

    def _level(self, groups: list[tuple[list[int], list[int]]], num_rows: int) -> PrefixLevel:
        width = max(len(blocks) for _, blocks in groups)
        seq_group = [-1] * num_rows
        for g, (members, _) in enumerate(groups):
            for b in members:
                seq_group[b] = g
        dev = self.device
        return PrefixLevel(
            block_tables=torch.tensor([blocks + [self.pad_block] * (width - len(blocks)) for _, blocks in groups],
                                      dtype=torch.int32).to(dev),
            lens=torch.tensor([len(blocks) * self.block_size for _, blocks in groups], dtype=torch.int32).to(dev),
            seq_group=torch.tensor(seq_group, dtype=torch.int32).to(dev))

    def _static(self, meta: AttentionMetadata) -> bool:
        return (self.static_decode is not None and meta.is_decode
                and self.static_decode.can_run(len(meta.query_lens_host)))

    @torch.inference_mode()
    def run(self, schedule: Schedule) -> tuple[torch.Tensor, list[int]]:
        """Returns logits [R, V] (fp32) of the sampling rows and, per scheduled sequence, its
        index into them (-1 when it does not sample this step)."""
        self.copy_blocks(schedule.copies)
        input_ids, meta, rows = self.build(schedule)
        if self._static(meta):  # every decode row samples
            return self.static_decode.run(input_ids, meta).float(), list(range(len(rows)))
        hidden = self.model(input_ids, meta.positions, self.cache, meta)
        sample_rows = [r for r in rows if r >= 0]
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, dtype=torch.int64, device=self.device)])
        index, k = [], 0
        for r in rows:
            index.append(k if r >= 0 else -1)
            k += r >= 0
        return logits.float(), index


def _common_run(tables: list[list[int]], limit: int) -> int:
    """Number of leading blocks that all tables hold in common, at most limit."""
    n, first = 0, tables[0]
    while n < limit and all(t[n] == first[n] for t in tables):
        n += 1
    return n
