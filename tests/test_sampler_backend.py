"""The engine's sampler_backend: which kernel serves which step (issue 13, build item 5).

"csrc" sends every all-greedy step to the CUDA C++ greedy kernel and every other step to the
Triton sampler. The kernel itself needs CUDA (tests/test_csrc_build.py and tests/gpu run it);
here the dispatch is checked on CPU with the kernel's torch reference standing in for the
extension, which is the one thing a CPU cannot build."""
from __future__ import annotations

import os

import pytest
import torch

import rrm_kernels.csrc_ops as csrc_ops
import rrm_kernels.sampling as ks
from rrm_engine.core.sampler import SampleRequest, kernel_backend, sample
from rrm_engine.sampling_params import SamplingParams


@pytest.fixture
def calls(monkeypatch):
    """Record which kernel each step reaches; the csrc op runs as its torch reference."""
    seen: list[str] = []

    def csrc(logits, row_index, splits=None, with_status=False):
        seen.append("csrc")
        return csrc_ops.greedy_argmax_lse_ref(logits, row_index, with_status=with_status)

    real_triton = ks.sample_triton

    def triton(*args, **kw):
        seen.append("triton")
        return real_triton(*args, **kw)

    monkeypatch.setattr(csrc_ops, "greedy_argmax_lse", csrc)
    monkeypatch.setattr(ks, "sample_triton", triton)
    return seen


def test_kernel_backend_rule():
    assert kernel_backend("csrc", all_greedy=True) == "csrc"
    assert kernel_backend("csrc", all_greedy=False) == "auto"
    for b in ("auto", "triton", "torch"):
        assert kernel_backend(b, all_greedy=True) == kernel_backend(b, all_greedy=False) == b


@pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton sampler on CPU tensors needs the interpreter")
def test_csrc_serves_greedy_steps_and_triton_the_rest(calls):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen)
    logits[2, 4] = float("nan")
    greedy = SamplingParams(temperature=0.0)
    hot = SamplingParams(temperature=0.7, top_k=5, seed=1)
    res = sample(logits, [SampleRequest(0, greedy, 0, 0), SampleRequest(1, greedy, 1, 0),
                          SampleRequest(2, greedy, 2, 0)], backend="csrc")
    assert calls == ["csrc"]
    assert [r.token for r in res[:2]] == logits[:2].argmax(1).tolist()
    want = torch.log_softmax(logits[:2], 1).gather(1, logits[:2].argmax(1)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([r.logprob for r in res[:2]]), want)
    assert [r.bad_logits for r in res] == [False, False, True]  # the kernel's flag reaches the engine
    calls.clear()
    res = sample(logits[:2], [SampleRequest(0, greedy, 0, 0), SampleRequest(1, hot, 1, 0)], backend="csrc")
    assert calls == []  # a sampled row: "auto", which on CPU logits is the torch sampler (Triton on CUDA)
    calls.clear()
    sample(logits[:2], [SampleRequest(0, greedy, 0, 0), SampleRequest(1, hot, 1, 0)], backend="triton")
    assert calls == ["triton"]


def test_engine_refuses_bad_or_unavailable_backends(tiny_qwen2_dir):
    from rrm_engine import LLM
    with pytest.raises(ValueError, match="sampler_backend"):
        LLM(str(tiny_qwen2_dir), device="cpu", kv_cache_tokens=256, sampler_backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="csrc.*CUDA"):
            LLM(str(tiny_qwen2_dir), device="cpu", kv_cache_tokens=256, sampler_backend="csrc")
