"""The engine on the Triton attention backend (shared-prefix decode: a query prefix shared across requests, then each request's votes) gives the
same samples as on the torch backend. Slow on CPU (TRITON_INTERPRET=1), so marked slow."""
from __future__ import annotations

import os

import pytest
import torch

from rrm_engine import LLM, SamplingParams
from rrm_engine.model.loader import LoadedModel

from tiny_engine_model import small_model

pytestmark = pytest.mark.slow


def model() -> LoadedModel:
    return small_model(max_pos=512, hidden=64, bias_std=None)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or TRITON_INTERPRET=1")
def test_triton_backend_matches_torch_backend_with_forks():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # one shared head (level 0 across requests), then each request's own tail (level 1: its votes)
    prompts = [list(range(40, 60)) + [100 + i] * (5 + 7 * i) for i in range(3)]
    params = SamplingParams(n=4, temperature=0.8, max_tokens=8, seed=1, ignore_eos=True)
    got = {}
    for backend in ("torch", "triton"):
        m = model()
        m.model.to(device)
        llm = LLM(m, device=device, kv_cache_tokens=512, block_size=4,
                  attention_backend=backend)
        levels = []
        build = llm.engine.runner.build

        def spy(schedule, build=build, levels=levels):
            out = build(schedule)
            levels.append(len(out[1].prefix_levels))
            return out

        llm.engine.runner.build = spy
        got[backend] = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
        if backend == "triton":
            assert max(levels) == 2  # both levels reached the shared-prefix kernel
    assert got["torch"] == got["triton"]
