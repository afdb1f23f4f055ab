"""Greedy decoding through the engine equals transformers' greedy generate, with and without
prefix caching, and under forced preemption (a KV pool too small for all requests at once)."""
from __future__ import annotations

import pytest
import torch

from rrm_engine import LLM, SamplingParams
from rrm_engine.model.loader import load_hf





GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@torch.no_grad()
def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """Plain argmax loop over transformers' model with its KV cache (no EOS or min-length logic)."""
    ids, past, out = torch.tensor([prompt]), None, []
    for _ in range(n):
        r = hf(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
        past = r.past_key_values
        out.append(int(r.logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_dir):
    return load_hf(tiny_qwen2_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    # two prompts share a 20-token head, so the prefix cache is exercised
    head = torch.randint(3, 49152, (20,), generator=g).tolist()
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (3, 33)] + [
        head + [11, 12, 13], head + torch.randint(3, 49152, (30,), generator=g).tolist()]


@pytest.fixture(scope="module")
def reference(hf_tiny_model, prompts):
    return [hf_greedy(hf_tiny_model, p, 32) for p in prompts]


@pytest.mark.parametrize("caching", [True, False])
def test_greedy_matches_transformers(tiny, prompts, reference, caching):
    llm = LLM(tiny, kv_cache_tokens=1024, enable_prefix_caching=caching)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    if caching:
        assert llm.metrics()["cached_prefix_tokens"] >= 16  # the shared head's full block
    llm.engine.check()


def test_greedy_under_preemption_and_chunking(tiny, prompts, reference):
    # 8 blocks of 16 tokens: one 63-token sequence needs 4 blocks, so the four requests cannot run together
    llm = LLM(tiny, kv_cache_tokens=8 * 16, max_num_batched_tokens=24)
    outs = llm.generate(prompts, GREEDY)
    m = llm.metrics()
    assert m["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in outs] == reference
    llm.engine.check()


def test_embedded_greedy_matches_transformers(embedded_model, hf_embedded_model):
    tok = embedded_model.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "<|im_start|>user\nWhich is larger, 9.11 or 9.9?<|im_end|>\n"]
    prompts = [tok.encode(t) for t in texts]
    llm = LLM(embedded_model, kv_cache_tokens=2048)
    outs = llm.generate(texts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.prompt_token_ids == p
        assert o.outputs[0].token_ids == hf_greedy(hf_embedded_model, p, 32)
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)


def test_padded_static_decode_path(tiny, prompts, reference):
    """cuda_graphs=True: decode runs through padded static buffers (graph replay on CUDA, eager
    here); padding rows write only to the scratch block, so outputs are unchanged."""
    llm = LLM(tiny, kv_cache_tokens=1024, cuda_graphs=True)
    calls = []
    run = llm.engine.runner.static_decode.run
    llm.engine.runner.static_decode.run = lambda ids, meta: calls.append(ids.shape[0]) or run(ids, meta)
    outs = llm.generate(prompts[:3], GREEDY)  # 3 rows: padded to 4
    assert [o.outputs[0].token_ids for o in outs] == reference[:3]
    assert 3 in calls
    llm.engine.check()
