"""LLM(kv_cache_dtype=...): an fp32 model on CPU with its KV cache in bf16 / fp16 (half the cache and
half the bytes attention reads). Lossy by design, so the test is against the fp32 cache on the real
embedded model: along the same greedy path the sampled tokens' log-probs stay close."""
from __future__ import annotations

import pytest
import torch

from rrm_engine import LLM, SamplingParams
from rrm_engine.layers.attention import TorchAttention
from rrm_engine.layers.attention.cpu_backend import CpuAttention
from rrm_engine.core.builder import _kv_cache_dtype

from tiny_engine_model import small_model

PROMPTS = ["<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n"]


def _greedy(llm: LLM) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=0)
    outs = llm.generate(PROMPTS, params)
    llm.engine.check()
    return [(c.token_ids, [lp[t] for t, lp in zip(c.token_ids, c.logprobs)])
            for c in (o.outputs[0] for o in outs)]


@pytest.mark.parametrize("backend,kind", [("cpu", CpuAttention), ("torch", TorchAttention)])
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_half_precision_cache_follows_the_fp32_cache(embedded_model, backend, kind, kv_dtype):
    ref_llm = LLM(embedded_model, attention_backend=backend, kv_cache_tokens=1024)
    ref = _greedy(ref_llm)
    del ref_llm
    llm = LLM(embedded_model, attention_backend=backend, kv_cache_tokens=1024, kv_cache_dtype=kv_dtype)
    assert isinstance(llm.engine.model.backend, kind)
    assert llm.engine.cache.k.dtype == getattr(torch, kv_dtype) and next(embedded_model.model.parameters()).dtype == torch.float32
    got = _greedy(llm)
    for (ref_tokens, ref_lps), (tokens, lps) in zip(ref, got):
        same = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), len(tokens))
        assert same >= 16, f"greedy paths part after {same} tokens"
        # while the paths agree, each sampled token's log-prob within 0.05 nats of the fp32 cache's
        err = max(abs(a - b) for a, b in zip(ref_lps[:same], lps[:same]))
        assert err < 0.05, err


def test_memory_plan_counts_the_cache_dtype():
    model = small_model()
    fp32 = LLM(model, kv_cache_tokens=512)
    bf16 = LLM(model, kv_cache_tokens=512, kv_cache_dtype="bf16")
    assert bf16.memory_plan()["kv_bytes_per_token"] * 2 == fp32.memory_plan()["kv_bytes_per_token"]
    assert bf16.engine.cache.k.element_size() == 2 and fp32.engine.cache.k.element_size() == 4
    assert bf16.memory_plan()["num_blocks"] == fp32.memory_plan()["num_blocks"]  # kv_cache_tokens is a token count


def test_auto_and_none_keep_the_run_dtype():
    model = small_model()
    for spec in (None, "auto"):
        assert LLM(model, kv_cache_tokens=512, kv_cache_dtype=spec).engine.cache.k.dtype == torch.float32


def test_bad_cache_dtypes_are_refused(monkeypatch):
    import rrm_engine.core.builder as llm_mod

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the bad option was refused")
    monkeypatch.setattr(llm_mod, "_load_for_rank", no_load)
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        LLM("embedded", kv_cache_dtype="int8")
    # off the CPU the Triton kernels read the cache in the model's dtype: another one is refused
    with pytest.raises(ValueError, match="only a CPU engine"):
        _kv_cache_dtype("bfloat16", torch.empty(1, dtype=torch.float32, device="meta"))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="only a CPU engine"):  # nor the Triton kernels on CPU (interpreter)
        LLM(small_model(), kv_cache_tokens=512, attention_backend="triton", kv_cache_dtype="bfloat16")
    assert _kv_cache_dtype("bfloat16", torch.empty(1, dtype=torch.bfloat16, device="meta")) == torch.bfloat16
