"""The cascade through the engine with RRM-shaped prompts and two queries in flight (issue 13 D2):
the runner builds three levels (system prompt for every row, each query's prompt for all its
comparisons, each comparison's prompt for its votes), and the samples equal those of the same
engine without any level (plain decode). Then the padded static-decode path (CUDA graphs; eager
on CPU) on the Triton backend: it keeps split-K sized to the step's context and the cascade
(build item 3), with the same samples as the eager path."""
from __future__ import annotations

import os
import random

import pytest
import torch

from rrm_engine import LLM, SamplingParams
from rrm_engine.model.loader import LoadedModel

from tiny_engine_model import small_model

BS = 16
# the Triton cases build CPU tensors for the interpreter; on a GPU, tests/gpu runs these paths
INTERPRETER = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter test (tests/gpu covers the GPU path)")
SYSTEM = list(range(3, 3 + 2 * BS))  # two whole blocks shared by every prompt


def tiny(max_len: int = 1024) -> LoadedModel:
    return small_model(max_pos=max_len, hidden=64, bias_std=None)


def rrm_prompts(queries: int, comparisons: int, query_len: int, pair_len: int) -> list[list[int]]:
    """System prompt + query q + the two responses of comparison c (token ids)."""
    r = random.Random(7)
    out = []
    for _ in range(queries):
        query = [r.randrange(40, 512) for _ in range(query_len)]
        for _ in range(comparisons):
            out.append(SYSTEM + query + [r.randrange(40, 512) for _ in range(pair_len)])
    return out


def generate(llm: LLM, prompts, params) -> tuple[list[list[list[int]]], list]:
    """Token ids per prompt per sample, and the prefix levels of every decode step built."""
    levels = []
    build = llm.engine.runner.build

    def spy(schedule):
        out = build(schedule)
        if out[1].is_decode:
            levels.append([lv.host for lv in out[1].prefix_levels])
        return out

    llm.engine.runner.build = spy
    outs = llm.generate(prompts, params)
    return [[c.token_ids for c in o.outputs] for o in outs], levels


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=[pytest.mark.slow, INTERPRETER])])
def test_two_queries_in_flight_three_levels_equal_plain_decode(backend):
    prompts = rrm_prompts(queries=2, comparisons=2, query_len=2 * BS, pair_len=BS + 5)
    params = SamplingParams(n=3, temperature=0.8, max_tokens=5, seed=3, ignore_eos=True)
    got = {}
    for cascade in (True, False):
        llm = LLM(tiny(), kv_cache_tokens=2048, block_size=BS, attention_backend=backend)
        if not cascade:
            llm.engine.runner.max_prefix_levels = 0
        got[cascade], levels = generate(llm, prompts, params)
        llm.engine.check()
        if cascade:
            # a step with all 12 votes decoding: system | query | comparison
            full = [lv for lv in levels if lv and len(lv[0].seq_group) == 12]
            assert full, "no decode step held all four requests' votes"
            l0, l1, l2 = full[0]
            assert l0.seq_group == [0] * 12 and l0.lens == [2 * BS]
            assert sorted(l1.seq_group) == [0] * 6 + [1] * 6 and l1.lens == [2 * BS, 2 * BS]
            assert sorted(l2.seq_group) == sorted([0, 1, 2, 3] * 3) and l2.lens == [BS] * 4
            # the votes of one comparison are one group at level 2, and one query's pairs one at level 1
            for g in range(4):
                rows = [r for r, x in enumerate(l2.seq_group) if x == g]
                assert len({l1.seq_group[r] for r in rows}) == 1
        else:
            assert not any(levels)
    assert got[True] == got[False]


@pytest.mark.slow
@INTERPRETER
def test_static_decode_on_triton_keeps_split_k_and_cascade():
    """cuda_graphs=True on CPU runs the graphs' padded path eagerly with the Triton kernels and
    the static plan they would read under a graph: its grid covers the model's 32K context, but
    the split length follows the step's real context (issue 13 R2: it used to be sized for the
    whole context, one split below 8K), and its levels are the step's prefix tree (the graph path
    used to skip the cascade). The samples equal the eager engine's."""
    import rrm_engine.layers.attention.triton_backend as tb
    from rrm_kernels.decode_plan import choose_num_splits, split_len_for
    # two requests of 2 votes sharing system prompt (level 0), each its own query+pair (level 1),
    # and an unrelated ~290-token prompt whose whole context is its suffix
    prompts = rrm_prompts(queries=2, comparisons=1, query_len=4 * BS, pair_len=4 * BS + 3)
    lone = [random.Random(1).randrange(40, 512) for _ in range(18 * BS + 3)]
    params = [SamplingParams(n=2, temperature=0.8, max_tokens=3, seed=9, ignore_eos=True)] * 2 + \
             [SamplingParams(n=1, temperature=0.8, max_tokens=3, seed=4, ignore_eos=True)]
    seen = []
    real = tb.decode_attention

    def spy(q, kc, vc, bt, seq_lens, scale, plan, out=None):
        b = q.shape[0]
        seen.append((b, plan.cap.splits, plan.cap.level_slots, int(plan.split_len[0]), plan.row_levels[:b].tolist(),
                     int(seq_lens[:b].max())))
        return real(q, kc, vc, bt, seq_lens, scale, plan, out)

    outs = {}
    for graphs in (False, True):
        llm = LLM(tiny(max_len=32768), kv_cache_tokens=4096, block_size=BS, attention_backend="triton",
                  cuda_graphs=graphs)
        seen.clear()
        tb.decode_attention = spy
        try:
            outs[graphs], _ = generate(llm, prompts + [lone], params)
        finally:
            tb.decode_attention = real
        if graphs:
            steps = [s for s in seen if s[0] == 8]  # 5 decode rows, padded to 8
            assert steps, seen
            _, grid_splits, slots, split_len, row_levels, ctx = steps[-1]
            assert grid_splits == choose_num_splits(32768, 8, 2) == 16 and slots == 3  # the graph's grids
            assert split_len == split_len_for(ctx, choose_num_splits(ctx, 8, 2), 16)  # the step's real context
            assert -(-ctx // split_len) >= 2  # so the long row really runs split-K
            assert sorted(row_levels[:5]) == [0, 2, 2, 2, 2] and row_levels[5:] == [0, 0, 0]
    assert outs[True] == outs[False]
