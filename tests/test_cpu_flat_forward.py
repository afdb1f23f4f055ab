"""rrm_engine/model/cpu_flat_forward.py: the CPU backend's decoder forward as one loop without the
modules gives, step by step, exactly (torch.equal) the hidden states of the modules' forward, over
real engine runs: cascade decode steps (votes sharing a prompt, comparisons sharing a head), steps
mixing prefill and decode rows, every weight format, a KV cache in another dtype, Qwen2's q/k/v
biases and Qwen3's q/k norms."""
from __future__ import annotations

import random

import pytest
import torch

from rrm_engine import LLM, SamplingParams
from rrm_engine.model.config import ModelConfig
from rrm_engine.model.cpu_flat_forward import FlatForward
from rrm_engine.model.loader import LoadedModel
from rrm_engine.model.decoder import Decoder

from tiny_engine_model import rand_ids, small_model


def qwen3_like() -> LoadedModel:
    cfg = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=512, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4,
                      max_position_embeddings=1024, tie_word_embeddings=True, qkv_bias=False, qk_norm=True)
    torch.manual_seed(1)
    dec = Decoder(cfg)
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(0.0, 0.3)
    return LoadedModel(dec.eval(), None, cfg, (2,))


def compare_each_step(decoder: Decoder) -> list[tuple[int, int, bool]]:
    """Make every serving forward run both ways on the same inputs (the modules' second pass
    stores the same K/V in the same slots); returns (decode rows, rows, equal) per step."""
    flat = decoder.serving_forward
    assert isinstance(flat, FlatForward)
    seen: list[tuple[int, int, bool]] = []

    def both(input_ids, positions, cache, meta):
        out = flat(input_ids, positions, cache, meta)
        decoder.serve_with(decoder.serving.replace(flat_forward=None))
        try:
            ref = decoder(input_ids, positions, cache, meta)
        finally:
            decoder.serve_with(decoder.serving.replace(flat_forward=both))
        seen.append((meta.num_decode, len(meta.query_lens_host), torch.equal(out, ref)))
        return out

    both.hooks_registered = flat.hooks_registered
    decoder.serve_with(decoder.serving.replace(flat_forward=both))
    return seen


def run_judging_like(llm: LLM, seed: int = 0) -> None:
    """Two comparisons sharing a 40-token head, 3 votes each, then a third request arriving while
    they decode (a step with prefill rows after decode rows)."""
    rng = random.Random(seed)
    head = rand_ids(rng, 40)
    params = SamplingParams(n=3, temperature=0.8, max_tokens=12, ignore_eos=True, seed=5)
    for _ in range(2):
        llm.add_request(head + rand_ids(rng, 25), params)
    for _ in range(4):
        llm.step()
    llm.add_request(rand_ids(rng, 30), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    while llm.engine.has_unfinished():
        llm.step()
    llm.engine.check()


CASES = [("fp32", None), ("q8_0", None), ("q4_1", None), ("bf16", None), ("fp32", "bfloat16")]


@pytest.mark.parametrize("weights,kv_dtype", CASES)
def test_flat_forward_equals_the_modules_step_by_step(weights, kv_dtype):
    loaded = small_model()
    llm = LLM(loaded, attention_backend="cpu", weights=weights, kv_cache_dtype=kv_dtype, kv_cache_tokens=1024,
              max_num_batched_tokens=64)
    seen = compare_each_step(llm.engine.model)
    run_judging_like(llm)
    assert seen and all(equal for *_, equal in seen), [s for s in seen if not s[2]]
    decode_only = [s for s in seen if s[0] == s[1]]
    mixed = [s for s in seen if 0 < s[0] < s[1]]
    assert len(decode_only) >= 5 and mixed, seen  # both kinds of step were compared


def test_flat_forward_with_qk_norm_and_tied_head():
    llm = LLM(qwen3_like(), attention_backend="cpu", kv_cache_tokens=1024)
    seen = compare_each_step(llm.engine.model)
    run_judging_like(llm, seed=1)
    assert len(seen) >= 5 and all(equal for *_, equal in seen)


def test_same_tokens_with_and_without_the_flat_forward():
    """End to end: sampled votes (seeded) and their log-probs are the same either way."""
    def votes(flat: bool):
        llm = LLM(small_model(), attention_backend="cpu", weights="q8_0", kv_cache_tokens=1024)
        if not flat:
            llm.engine.model.serve_with(llm.engine.model.serving.replace(flat_forward=None))
        rng = random.Random(3)
        head = rand_ids(rng, 30)
        outs = llm.generate([head + rand_ids(rng, 20) for _ in range(2)],
                            SamplingParams(n=4, temperature=1.0, max_tokens=16, ignore_eos=True, seed=7, logprobs=0))
        return [(c.token_ids, c.logprobs) for o in outs for c in o.outputs]

    assert votes(True) == votes(False)


def test_only_the_cpu_backend_serves_flat():
    loaded = small_model()
    assert isinstance(LLM(loaded, attention_backend="cpu", kv_cache_tokens=256).engine.model.serving_forward,
                      FlatForward)
    # the same decoder handed to the torch backend afterwards runs its modules again
    assert LLM(loaded, attention_backend="torch", kv_cache_tokens=256).engine.model.serving_forward is None
    # training (autograd on) never takes the serving path
    dec = LLM(loaded, attention_backend="cpu", kv_cache_tokens=256).engine.model
    ids = torch.tensor([[5, 6, 7]])
    logits = dec.compute_logits(dec(ids, torch.arange(3)[None]))
    assert logits.requires_grad


def test_forward_hooks_still_fire(monkeypatch):
    """A hook on any module (tests inject faults this way, users capture activations) sends the
    step through the modules; without hooks the flat loop runs again."""
    flat_calls = []
    real = FlatForward.__call__
    monkeypatch.setattr(FlatForward, "__call__", lambda self, *a: flat_calls.append(1) or real(self, *a))
    llm = LLM(small_model(), attention_backend="cpu", kv_cache_tokens=256)
    dec = llm.engine.model
    fired = []
    handle = dec.model.layers[1].mlp.down_proj.register_forward_hook(lambda *a: fired.append(1))
    llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert fired and not flat_calls
    handle.remove()
    fired.clear()
    llm.generate([[5, 6, 7, 9]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert flat_calls and not fired
    pre = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: fired.append(1))
    try:
        assert dec.serving_forward.hooks_registered()
    finally:
        pre.remove()
    assert not dec.serving_forward.hooks_registered()
