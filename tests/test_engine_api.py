"""The public API's promises: seeded sampling is reproducible and independent of the batch,
abort frees a request without disturbing the others, bad input is refused before it is queued,
log-probs are the model's, stop strings / stop ids end a sample where they should."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rrm_engine import LLM, SamplingParams
from rrm_engine.model.config import ModelConfig
from rrm_engine.model.loader import LoadedModel, load_hf
from rrm_engine.model.decoder import Decoder




@pytest.fixture(scope="module")
def model() -> LoadedModel:
    """A tiny random Qwen2 with a 512-token vocabulary and a 256-token context."""
    cfg = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.1, use_sliding_window=False,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    hf = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.bias.normal_(0.0, 0.5)
    dec = Decoder(ModelConfig.from_hf(cfg.to_dict() | {"architectures": ["Qwen2ForCausalLM"]}))
    dec.load_state_dict(hf.state_dict())
    return LoadedModel(dec.eval(), None, dec.cfg, (2,))


def ids(seed: int, n: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(3, 512) for _ in range(n)]


SAMPLED = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=10, seed=11, ignore_eos=True)


def tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    prompt = ids(0, 21)
    alone = LLM(model, kv_cache_tokens=1024).generate([prompt], SAMPLED)[0]
    again = LLM(model, kv_cache_tokens=1024).generate([prompt], SAMPLED)[0]
    assert tokens(alone) == tokens(again)
    # in a crowd, with other requests ahead of it, chunked prefill and a different row order
    others = [ids(i, 30 + i) for i in range(1, 6)]
    crowd = LLM(model, kv_cache_tokens=1024, max_num_batched_tokens=40).generate(
        others + [prompt], [SamplingParams(n=2, temperature=0.7, max_tokens=12)] * 5 + [SAMPLED])[-1]
    assert tokens(crowd) == tokens(alone)
    assert len({tuple(t) for t in tokens(alone)}) > 1
    # unseeded requests draw their seeds from the LLM's seed: same LLM seed, same output
    free = SamplingParams(n=2, temperature=1.0, max_tokens=8, ignore_eos=True)
    a = LLM(model, kv_cache_tokens=1024, seed=5).generate([prompt, prompt], free)
    b = LLM(model, kv_cache_tokens=1024, seed=5).generate([prompt, prompt], free)
    assert [tokens(o) for o in a] == [tokens(o) for o in b]
    assert tokens(a[0]) != tokens(a[1])


def test_abort_mid_generation_frees_blocks_and_spares_others(model):
    prompts = [ids(i, 20 + 3 * i) for i in range(3)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference = [tokens(o) for o in LLM(model, kv_cache_tokens=1024).generate(prompts, greedy)]
    llm = LLM(model, kv_cache_tokens=1024, enable_prefix_caching=False)
    kept = [llm.add_request(p, greedy) for p in prompts]
    victim = llm.add_request(ids(9, 40), SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=1))
    done = {}
    for _ in range(5):
        done.update({o.request_id: o for o in llm.step() if o.finished})
    used = llm.engine.pool.num_used
    out = llm.abort(victim)
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"] * 4
    assert all(0 < len(c.token_ids) < 24 for c in out.outputs)
    assert llm.engine.pool.num_used < used
    assert llm.abort(victim) is None
    while llm.has_unfinished():
        done.update({o.request_id: o for o in llm.step() if o.finished})
    assert victim not in done
    assert [tokens(done[r]) for r in kept] == reference
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks  # no cache: every block back
    llm.engine.check()


@pytest.mark.parametrize("bad, match", [
    (lambda llm: llm.add_request([], SamplingParams()), "empty"),
    (lambda llm: llm.add_request([5] * 256, SamplingParams()), "context"),
    (lambda llm: llm.add_request([5, 512], SamplingParams()), "vocabulary"),
    (lambda llm: llm.add_request([5, -1], SamplingParams()), "vocabulary"),
    (lambda llm: llm.add_request([5] * 100, SamplingParams(max_tokens=150)), "KV blocks"),
    (lambda llm: llm.add_request([5], SamplingParams(stop_token_ids=[600])), "stop_token_ids"),
    (lambda llm: llm.add_request([5], SamplingParams(logprob_token_ids=[512])), "logprob_token_ids"),
    (lambda llm: llm.add_request([5], SamplingParams(stop="x")), "tokenizer"),
    (lambda llm: llm.add_request([5], SamplingParams(), request_id="first"), "already in use"),
    (lambda llm: llm.generate([[5, 6], []], SamplingParams()), "empty"),
    (lambda llm: llm.generate([[5], [6]], [SamplingParams()]), "2 prompts"),
])
def test_bad_input_is_refused_before_scheduling(model, bad, match):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompt = ids(3, 30)
    reference = tokens(LLM(model, kv_cache_tokens=160).generate([prompt], greedy)[0])
    llm = LLM(model, kv_cache_tokens=160)  # 10 blocks: a 250-token sequence can never fit
    llm.add_request(prompt, greedy, request_id="first")
    llm.step()
    with pytest.raises(ValueError, match=match):
        bad(llm)
    assert list(llm.engine.requests) == ["first"]  # nothing of the bad call was queued
    outs = []
    while llm.has_unfinished():
        outs += llm.step()
    assert [o.request_id for o in outs] == ["first"] and tokens(outs[0]) == reference


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must"), (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(min_p=1.5), "min_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(stop=3), "stop"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-2]), "stop_token_ids"), (dict(logprobs=-1), "logprobs"), (dict(seed=1.5), "seed"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_dir):
    return load_hf(tiny_qwen2_dir, device="cpu", dtype=torch.float32)


def test_logprobs_are_the_models(tiny, hf_tiny_model):
    prompt = ids(5, 12)
    asked = [5, 7, 100, 49151]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, logprob_token_ids=asked)
    c = LLM(tiny, kv_cache_tokens=256).generate([prompt], params)[0].outputs[0]
    with torch.no_grad():
        logits = hf_tiny_model(torch.tensor([prompt + c.token_ids])).logits[0]
    ref = torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)  # next-token distribution at each step
    assert len(c.logprobs) == 4
    for t, (tok, d) in enumerate(zip(c.token_ids, c.logprobs)):
        assert tok == int(ref[t].argmax())
        top = ref[t].topk(3).indices.tolist()
        assert set(d) == {tok} | set(top) | set(asked)
        for k, v in d.items():
            assert v == pytest.approx(float(ref[t, k]), abs=1e-4)
    assert c.cumulative_logprob == pytest.approx(sum(float(ref[t, tok]) for t, tok in enumerate(c.token_ids)), abs=1e-3)


def test_sampling_logprobs_are_the_tempered_distributions(tiny, hf_tiny_model):
    """Per-token sampling log-probs (what an RL trainer recomputes) equal log_softmax(logits / T)
    of transformers' logits at each sampled token, for every one of n forked samples."""
    prompt, temp = ids(6, 10), 0.7
    out = LLM(tiny, kv_cache_tokens=512).generate(
        [prompt], SamplingParams(n=3, temperature=temp, max_tokens=5, ignore_eos=True, seed=3))[0]
    for c in out.outputs:
        with torch.no_grad():
            logits = hf_tiny_model(torch.tensor([prompt + c.token_ids])).logits[0]
        ref = torch.log_softmax(logits[len(prompt) - 1:-1].float() / temp, dim=-1)
        want = [float(ref[t, tok]) for t, tok in enumerate(c.token_ids)]
        assert c.sampling_logprobs == pytest.approx(want, abs=1e-4)
        assert c.cumulative_logprob == pytest.approx(sum(c.sampling_logprobs), abs=1e-6)


def test_stop_strings_and_stop_ids(tiny):
    llm = LLM(tiny, kv_cache_tokens=512)
    prompt = "The weather today is"
    greedy = dict(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate(prompt, SamplingParams(**greedy))[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    at = text.find(stop)
    assert stop.strip() and at > 0
    cut = llm.generate(prompt, SamplingParams(stop=[stop, "\x00never"], **greedy))[0].outputs[0]
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (text[:at], "stop", stop)
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) < 24
    inc = llm.generate(prompt, SamplingParams(stop=stop, include_stop_str_in_output=True, **greedy))[0].outputs[0]
    assert inc.text == text[:at + len(stop)]
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    by_id = llm.generate(prompt, SamplingParams(stop_token_ids=[stop_id], **greedy))[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:first + 1]
    assert (by_id.finish_reason, by_id.stop_reason) == ("stop", stop_id)
