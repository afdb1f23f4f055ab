"""Decode steps through fixed, padded buffers, so that one CUDA graph per padded batch size
(1, 2, 4, 8, ...) can be captured once and replayed every step.

A graph replays the exact kernels and shapes it captured, so everything it reads must live in
these buffers and no shape may depend on the step: rows past the real batch are padding that
writes its K/V into a scratch block owned by no sequence, and the attention metadata claims the
model's full context as max_seq_len (the real lengths come from seq_lens on the device). The
shared-prefix levels change shape every step and are therefore not used on this path.

On CUDA the graphs are captured lazily, on first use of each size. Elsewhere the same padded
path runs eagerly (that is how the CPU tests check the padding). This path has only been
tested on CPU so far: graph capture itself still needs a run on a GPU.
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata, KVCache
from .model import Decoder


class StaticDecode:
    def __init__(self, model: Decoder, cache: KVCache, max_batch: int, max_model_len: int, scratch_block: int):
        self.model, self.cache = model, cache
        self.bs = cache.block_size
        self.max_model_len = max_model_len
        self.scratch_block = scratch_block
        self.sizes = [1]
        while self.sizes[-1] < max_batch:
            self.sizes.append(self.sizes[-1] * 2)
        n, dev = self.sizes[-1], cache.k.device
        self.capture = dev.type == "cuda"
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(n, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((n, -(-max_model_len // self.bs)), scratch_block, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # graph memory pool shared by all sizes

    def can_run(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def _meta(self, p: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:p], slot_mapping=self.slots[:p], query_start_loc=self.query_start_loc[:p + 1],
            seq_lens=self.seq_lens[:p], block_tables=self.block_tables[:p],
            query_lens_host=[1] * p, seq_lens_host=[self.max_model_len] * p)

    def _forward(self, p: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:p], self.positions[:p], self.cache, self._meta(p))
        return self.model.compute_logits(hidden)

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [B, V] of a pure decode step of B <= max_batch rows."""
        b = input_ids.shape[0]
        p = next(s for s in self.sizes if s >= b)
        self.input_ids[:b] = input_ids
        self.positions[:b] = meta.positions
        self.slots[:b] = meta.slot_mapping
        self.seq_lens[:b] = meta.seq_lens
        w = meta.block_tables.shape[1]
        self.block_tables[:b, :w] = meta.block_tables
        # padding rows: one token at position 0 of the scratch block
        self.input_ids[b:p] = 0
        self.positions[b:p] = 0
        self.slots[b:p] = self.scratch_block * self.bs
        self.seq_lens[b:p] = 1
        self.block_tables[b:p, 0] = self.scratch_block
        if not self.capture:
            return self._forward(p)[:b]
        if p not in self.graphs:
            self._capture(p)
        graph, logits = self.graphs[p]
        graph.replay()
        return logits[:b]

    def _capture(self, p: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                self._forward(p)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(p)
        self.pool = graph.pool()
        self.graphs[p] = (graph, logits)
