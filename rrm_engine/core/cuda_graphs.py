"""Decode steps through fixed, padded buffers, so that one CUDA graph per padded batch size
(1, 2, 4, 8, ...) can be captured once and replayed every step.

A graph replays the exact kernels and grids it captured, so everything it reads must live in
these buffers and no shape may depend on the step: rows past the real batch are padding that
writes its K/V into a scratch block owned by no sequence. With the Triton backend the step's
decode plan (rrm_kernels/decode_plan.py) lives in static buffers too: each step writes its split
lengths, each row's suffix start and the shared-prefix work items there before the replay, so
the graphs keep split-K sized to the step's real context (not the model's) and the cascade over
the step's prefix tree. Grids are sized for the worst case of each batch size; the programs a
step does not need find empty ranges and return.

capture_all() captures every size (the engine calls it at start-up, so memory planning sees the
graphs' pools; it is idempotent). Elsewhere than CUDA the same padded path, plan buffers included,
runs eagerly: that is how the CPU tests check it. This path has only been tested on CPU so far:
graph capture itself still needs a run on a GPU.
"""
from __future__ import annotations

import torch

from rrm_kernels.decode_plan import StaticDecodePlan

from ..layers.attention import AttentionMetadata, KVCache
from ..model.decoder import Decoder


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
        self.plans: StaticDecodePlan | None = None  # the Triton backend's plan buffers, made on first use
        self.logits: torch.Tensor | None = None  # [n, V], written by every graph (one buffer for all sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None  # graph memory pool shared by all sizes

    def can_run(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def _plans(self) -> StaticDecodePlan | None:
        """Plan buffers for a backend that launches from a DecodePlan (TritonAttention), else None."""
        if self.plans is None and getattr(self.model.backend, "uses_decode_plan", False):
            cfg, k = self.model.cfg, self.cache.k
            hkv = k.shape[3]  # this rank's kv heads (tensor parallel shards hold fewer)
            self.plans = StaticDecodePlan(self.sizes[-1], hkv * (cfg.num_heads // cfg.num_kv_heads), hkv, k.shape[4],
                                          self.bs, self.max_model_len, k.device)
        return self.plans

    def _meta(self, p: int, seq_lens_host: list[int]) -> AttentionMetadata:
        plans = self._plans()
        return AttentionMetadata(
            positions=self.positions[:p], slot_mapping=self.slots[:p], query_start_loc=self.query_start_loc[:p + 1],
            seq_lens=self.seq_lens[:p], block_tables=self.block_tables[:p],
            query_lens_host=[1] * p, seq_lens_host=seq_lens_host,
            decode_plan=plans.view(p) if plans is not None else None)

    def _forward(self, p: int, seq_lens_host: list[int]) -> torch.Tensor:
        hidden = self.model(self.input_ids[:p], self.positions[:p], self.cache, self._meta(p, seq_lens_host))
        return self.model.compute_logits(hidden)

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [B, V] of a pure decode step of B <= max_batch rows (meta's prefix levels, if
        any, reach the Triton kernels through the static plan)."""
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
        plans = self._plans()
        if plans is not None:
            plans.fill(p, meta.seq_lens_host, meta.prefix_levels)
        if not self.capture:
            return self._forward(p, list(meta.seq_lens_host) + [1] * (p - b))[:b]
        if p not in self.graphs:
            self._capture(p)
        self.graphs[p].replay()
        return self.logits[:b]

    def capture_all(self) -> list[int]:
        """Capture the graph of every padded batch size not captured yet, largest first (smaller
        graphs then reuse the shared pool's memory); returns the sizes captured. A no-op off CUDA.
        Call it after the KV cache exists (graphs hold its address): the engine does at start-up."""
        if not self.capture:
            return []
        done = []
        for p in reversed(self.sizes):
            if p not in self.graphs:
                self._idle_rows(p)
                self._capture(p)
                done.append(p)
        return done

    def _idle_rows(self, p: int) -> None:
        """Buffers of p padding rows (each decodes one token in the scratch block), no levels."""
        self.input_ids[:p] = 0
        self.positions[:p] = 0
        self.slots[:p] = self.scratch_block * self.bs
        self.seq_lens[:p] = 1
        self.block_tables[:p, 0] = self.scratch_block
        plans = self._plans()
        if plans is not None:
            plans.fill(p, [1] * p)

    def _capture(self, p: int) -> None:
        lens = [self.max_model_len] * p  # host bound of the captured launch (the plan holds the real ones)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                logits = self._forward(p, lens)
        torch.cuda.current_stream().wait_stream(stream)
        if self.logits is None:  # allocated outside any graph, shared by all of them
            self.logits = torch.empty(self.sizes[-1], logits.shape[1], dtype=logits.dtype, device=logits.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[:p].copy_(self._forward(p, lens))
        self.pool = graph.pool()
        self.graphs[p] = graph
