"""The engine on the Triton attention backend (shared-prefix decode: a query prefix shared across requests, then each request's votes) gives the
same samples as on the torch backend. Slow on CPU (TRITON_INTERPRET=1), so marked slow."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rrm_engine import LLM, SamplingParams
from rrm_engine.config import ModelConfig
from rrm_engine.loader import LoadedModel
from rrm_engine.model import Decoder

pytestmark = pytest.mark.slow


def model() -> LoadedModel:
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.1, use_sliding_window=False)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg)
    dec = Decoder(ModelConfig.from_hf(cfg.to_dict() | {"architectures": ["Qwen2ForCausalLM"]}))
    dec.load_state_dict(hf.state_dict())
    return LoadedModel(dec.eval(), None, dec.cfg, (2,))


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
