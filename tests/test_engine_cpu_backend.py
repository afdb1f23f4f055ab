"""The C++ CPU backend through the engine: the same samples as the torch backend (sampled and
greedy, shared prefixes, mixed chunked-prefill + decode steps), and the fall-back to torch with
one log line when the ops cannot be built."""
from __future__ import annotations

import logging
import random

import pytest
import torch

from rrm_engine import LLM, SamplingParams
from rrm_engine.layers.attention import TorchAttention
from rrm_engine.layers.attention.cpu_backend import CpuAttention

from tiny_engine_model import rand_ids, small_model


def _run(backend: str, prompts, params) -> tuple[list, dict]:
    llm = LLM(small_model(), kv_cache_tokens=4096, block_size=16, attention_backend=backend,
              max_num_batched_tokens=64)  # a 64-token budget: long prompts prefill in chunks beside decodes
    mixed = []
    build = llm.engine.runner.build

    def spy(schedule):
        out = build(schedule)
        q = out[1].query_lens_host
        mixed.append(1 in q and any(n > 1 for n in q))
        return out

    llm.engine.runner.build = spy
    outs = llm.generate(prompts, params)
    llm.engine.check()
    return [[c.token_ids for c in o.outputs] for o in outs], {"mixed_steps": sum(mixed), "backend": llm.engine.model.backend}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cpu_backend_samples_equal_torch_backend(temperature):
    rng = random.Random(1)
    shared = rand_ids(rng, 40)
    prompts = [shared + rand_ids(rng, 30), shared + rand_ids(rng, 7), rand_ids(rng, 150), rand_ids(rng, 5)]
    params = SamplingParams(n=3, temperature=temperature, max_tokens=12, seed=5, ignore_eos=True)
    cpu, info = _run("cpu", prompts, params)
    ref, _ = _run("torch", prompts, params)
    assert isinstance(info["backend"], CpuAttention)
    assert info["mixed_steps"] > 0  # the 150-token prompt prefilled in chunks while others decoded
    assert cpu == ref


def test_auto_falls_back_to_torch_with_one_log_line(monkeypatch, caplog):
    from rrm_kernels import cpu_ops

    # a process where the build failed: load() re-raises that failure, nothing is loaded
    monkeypatch.setattr(cpu_ops, "_module", None)
    monkeypatch.setattr(cpu_ops, "_failure", RuntimeError("building the CPU ops (cpu_decode_ops.cpp) failed: no compiler"))
    with caplog.at_level(logging.WARNING, logger="rrm_engine"):
        llm = LLM(small_model(), kv_cache_tokens=512, attention_backend="auto")
    assert isinstance(llm.engine.model.backend, TorchAttention)
    lines = [r for r in caplog.records if r.name == "rrm_engine"]
    assert len(lines) == 1 and "torch attention backend" in lines[0].getMessage() and "no compiler" in lines[0].getMessage()
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3))
    assert len(out[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="attention_backend='cpu' is not available"):
        LLM(small_model(), kv_cache_tokens=512, attention_backend="cpu")


def test_training_path_never_uses_the_kernels():
    # the backend's kernels serve inference only: under autograd the decoder runs torch ops and
    # gradients flow (the kernels have no backward)
    llm = LLM(small_model(), kv_cache_tokens=512, attention_backend="cpu")
    model = llm.engine.model
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = model.compute_logits(model(ids, torch.arange(4)[None]))
    logits.sum().backward()
    assert model.model.layers[0].mlp.gate_up_proj.weight.grad is not None
    with torch.no_grad():
        again = model.compute_logits(model(ids, torch.arange(4)[None]))  # kernels on
    torch.testing.assert_close(again, logits.detach(), rtol=1e-5, atol=1e-5)
