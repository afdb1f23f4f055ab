"""A tiny random Qwen2 with a small vocabulary for engine tests that run many steps: cheap to
step and to sample, real decoder (q/k/v biases non-zero). Imported by test modules (pytest puts
tests/ on sys.path)."""
from __future__ import annotations

import random

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rrm_engine.model.config import ModelConfig
from rrm_engine.model.loader import LoadedModel
from rrm_engine.model.decoder import Decoder


def small_model(vocab: int = 512, max_pos: int = 1024, seed: int = 0, hidden: int = 32,
                bias_std: float | None = 0.5) -> LoadedModel:
    """bias_std: q/k/v biases drawn from N(0, bias_std); None keeps transformers' zero biases."""
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      tie_word_embeddings=False, initializer_range=0.1, use_sliding_window=False,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(cfg)
    if bias_std is not None:
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, bias_std)
    dec = Decoder(ModelConfig.from_hf(cfg.to_dict() | {"architectures": ["Qwen2ForCausalLM"]}))
    dec.load_state_dict(hf.state_dict())
    return LoadedModel(dec.eval(), None, dec.cfg, (2,))


def rand_ids(rng: random.Random, n: int, vocab: int = 512) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]
