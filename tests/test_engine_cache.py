"""The prefix cache at work: k votes prefill once, a common prefix submitted together is
computed once, a finished sequence can be continued without recomputing its KV, and the cache's
books balance under a random workload (no leaked block, no double free, no negative count)."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rrm_engine import LLM, SamplingParams
from rrm_engine.model.config import ModelConfig
from rrm_engine.model.loader import LoadedModel
from rrm_engine.model.decoder import Decoder




def small_model(vocab: int = 512, max_pos: int = 1024) -> LoadedModel:
    """A tiny random Qwen2 (q/k/v biases non-zero) with a small vocabulary: cheap to sample."""
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      tie_word_embeddings=False, initializer_range=0.1, use_sliding_window=False,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    d = cfg.to_dict() | {"architectures": ["Qwen2ForCausalLM"]}
    dec = Decoder(ModelConfig.from_hf(d))
    dec.load_state_dict(hf.state_dict())
    return LoadedModel(dec.eval(), None, dec.cfg, (2,))


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return small_model()


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 512) for _ in range(n)]


@pytest.mark.parametrize("budget", [2048, 128])
def test_n_votes_prefill_the_prompt_once(model, budget):
    prompt = rand_ids(random.Random(1), 500)
    llm = LLM(model, kv_cache_tokens=2048, max_num_batched_tokens=budget)
    [out] = llm.generate([prompt], SamplingParams(n=8, temperature=1.0, max_tokens=4, seed=3, ignore_eos=True))
    m = llm.metrics()
    assert m["prefill_tokens_computed"] == 500
    assert m["generated_tokens"] == 32
    assert [c.index for c in out.outputs] == list(range(8))
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "8 seeded samples all equal: seeds not per sample"
    llm.engine.check()


def test_common_prefix_submitted_together_is_computed_once(model):
    rng = random.Random(2)
    prefix = rand_ids(rng, 300)
    suffixes = [[3 + i] + rand_ids(rng, rng.randrange(5, 40)) for i in range(8)]  # distinct first tokens
    prompts = [prefix + s for s in suffixes]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(model, kv_cache_tokens=4096)
    outs = llm.generate(prompts, greedy)
    m = llm.metrics()
    assert m["prefill_tokens_computed"] == 300 + sum(len(s) for s in suffixes)
    assert m["cached_prefix_tokens"] == 7 * 300
    assert [o.num_cached_tokens for o in outs] == [0] + [300] * 7
    plain = LLM(model, kv_cache_tokens=4096, enable_prefix_caching=False).generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]


def test_continuing_a_finished_sequence_reuses_its_kv(model):
    rng = random.Random(3)
    prompt = rand_ids(rng, 37)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm = LLM(model, kv_cache_tokens=1024)
    gen = llm.generate([prompt], greedy)[0].outputs[0].token_ids
    extra = rand_ids(rng, 5)
    llm.reset_metrics()
    cont = llm.generate([prompt + gen + extra], greedy)[0]
    m = llm.metrics()
    # the last generated token was sampled but never fed through the model: it is new work too
    assert m["prefill_tokens_computed"] == len(extra) + 1
    assert cont.num_cached_tokens == len(prompt) + len(gen) - 1
    fresh = LLM(model, kv_cache_tokens=1024, enable_prefix_caching=False).generate([prompt + gen + extra], greedy)[0]
    assert cont.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_random_workload_keeps_the_books(model):
    rng = random.Random(4)
    heads = [rand_ids(rng, rng.randrange(1, 30)) for _ in range(6)]
    # 48 blocks of 4 tokens: small enough that eviction and preemption happen all the time
    llm = LLM(model, kv_cache_tokens=48 * 4, block_size=4, max_num_batched_tokens=64, max_num_seqs=16)
    eng = llm.engine
    submitted, finished, aborted = 0, {}, set()
    live: list[str] = []
    while submitted < 500 or eng.has_unfinished():
        for _ in range(min(rng.randrange(0, 8), 500 - submitted)):
            prompt = rng.choice(heads) + rand_ids(rng, rng.randrange(0, 30))
            prompt = prompt or [5]
            t = rng.choice([0.0, 0.8, 1.5])
            params = SamplingParams(n=rng.choice([1, 1, 2, 3]), temperature=t, top_k=rng.choice([0, 5]),
                                    top_p=rng.choice([1.0, 0.9]), max_tokens=rng.randrange(1, 13),
                                    stop_token_ids=rng.choice([[], [rng.randrange(3, 512)]]),
                                    seed=rng.choice([None, rng.randrange(100)]))
            live.append(llm.add_request(prompt, params))
            submitted += 1
        if live and rng.random() < 0.05:
            rid = live.pop(rng.randrange(len(live)))
            if llm.abort(rid) is not None:
                aborted.add(rid)
        for out in llm.step():
            if out.finished:
                assert out.request_id not in finished, "a request finished twice"
                finished[out.request_id] = out
                assert len(out.outputs) == out.outputs[0].index + len(out.outputs)
                for c in out.outputs:
                    assert c.finish_reason in ("stop", "length")
                    assert 1 <= len(c.token_ids) <= 12
        eng.check()
    assert len(finished) + len(aborted) == 500
    m = llm.metrics()
    assert m["num_preemptions"] > 0 and m["cached_prefix_tokens"] > 0
    # only the prefix cache holds blocks now, and dropping it frees every one
    assert all(c in (0, 1) for c in eng.pool.ref_counts)
    llm.invalidate_prefix_cache()
    assert eng.pool.num_free == eng.pool.num_blocks
    eng.check()
