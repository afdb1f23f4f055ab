"""Start-up checks (issue 22, item 6): every backend and format choice of LLM(...), and
RRM_CPU_ISA, is refused before the model is read when it cannot run, as one ValueError naming it,
instead of building an engine whose every step fails. RRM_CPU_ISA has one parser
(rrm_kernels/cpu_isa.py) for both C++ libraries: "auto" means the best for each."""
from __future__ import annotations

import os

import pytest
import torch

from rrm_engine import LLM, SamplingParams
from rrm_kernels import cpu_isa, cpu_ops, quant_linear_cpu

from tiny_engine_model import small_model

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
AVX512_NO_VNNI = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.fixture
def no_load(monkeypatch):
    """LLM(...) must refuse before it reads a weight: loading raises."""
    import rrm_engine.core.builder as builder

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad option was refused")
    monkeypatch.setattr(builder, "_load_for_rank", refuse)


@pytest.mark.parametrize("value, want", [(None, None), ("", None), ("auto", None), (" AUTO ", None),
                                         ("scalar", "scalar"), ("avx2", "avx2"), ("Avx512", "avx512")])
def test_one_parser_for_both_libraries(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(cpu_isa.ISA_ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_isa.ISA_ENV, value)
    assert cpu_isa.requested() == want
    assert cpu_ops.isa_code() == (-1 if want is None else cpu_ops.ISAS[want])
    assert quant_linear_cpu.default_isa() == (want or "auto")


@pytest.mark.parametrize("value", ["sse9", "avx-512", "best", "0"])
def test_unknown_value_is_one_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(cpu_isa.ISA_ENV, value)
    for read in (cpu_isa.requested, cpu_ops.isa_code, quant_linear_cpu.default_isa):
        with pytest.raises(ValueError, match=f"RRM_CPU_ISA must be one of auto, scalar, avx2, avx512.*{value!r}"):
            read()


def test_forced_isa_checked_against_the_cpu_flags(monkeypatch):
    monkeypatch.setenv(cpu_isa.ISA_ENV, "avx512")
    with pytest.raises(ValueError, match=r"RRM_CPU_ISA='avx512'.*lacks avx512f, avx512bw, avx512vl, avx512dq; "
                                         r"it can run avx2, scalar"):
        cpu_isa.check_cpu_supports("cpu_ops", flags=AVX2_ONLY)
    # the quantised linear's AVX-512 path also needs VNNI; the decode ops do not
    assert cpu_isa.check_cpu_supports("cpu_ops", flags=AVX512_NO_VNNI) == "avx512"
    with pytest.raises(ValueError, match="quant_linear_cpu, but this CPU lacks avx512_vnni"):
        cpu_isa.check_cpu_supports("quant_linear_cpu", flags=AVX512_NO_VNNI)
    monkeypatch.setenv(cpu_isa.ISA_ENV, "avx2")
    assert cpu_isa.check_cpu_supports("cpu_ops", flags=AVX2_ONLY) == "avx2"
    with pytest.raises(ValueError, match="lacks avx2, fma, f16c; it can run scalar"):
        cpu_isa.check_cpu_supports("cpu_ops", flags=frozenset({"sse2"}))
    monkeypatch.setenv(cpu_isa.ISA_ENV, "auto")
    assert cpu_isa.check_cpu_supports("cpu_ops", flags=frozenset()) is None


def test_forced_isa_checked_against_a_built_library(monkeypatch):
    monkeypatch.setenv(cpu_isa.ISA_ENV, "avx512")
    with pytest.raises(ValueError, match="forces the avx512 path of cpu_ops, which this CPU does not support"):
        cpu_isa.check_supported(["avx2", "scalar"], "cpu_ops")
    assert cpu_isa.check_supported(["avx512", "avx2", "scalar"], "cpu_ops") == "avx512"
    # this machine's own answer agrees with its flags
    monkeypatch.delenv(cpu_isa.ISA_ENV)
    flags_say = [n for n in reversed(cpu_isa.ISA_NAMES) if not cpu_isa.missing_flags(n, "cpu_ops")]
    if cpu_isa.cpu_flags() is not None:
        assert cpu_ops.supported_isas() == flags_say


def test_llm_refuses_a_cpu_isa_this_cpu_lacks_before_loading(monkeypatch, no_load):
    monkeypatch.setenv(cpu_isa.ISA_ENV, "avx512")
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: AVX2_ONLY)  # the CPU an AVX2 machine reports
    with pytest.raises(ValueError, match="RRM_CPU_ISA='avx512' forces the avx512 path of cpu_ops"):
        LLM("embedded")
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: AVX512_NO_VNNI)
    with pytest.raises(ValueError, match="quant_linear_cpu, but this CPU lacks avx512_vnni"):
        LLM("embedded", weights="q4_1")
    monkeypatch.setenv(cpu_isa.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="RRM_CPU_ISA must be one of"):
        LLM("embedded")


@pytest.mark.parametrize("kwargs, match", [
    (dict(attention_backend="flash"), "attention_backend must be"),
    (dict(sampler_backend="cuda"), "sampler_backend must be"),
    (dict(weights="q5_k"), "weights must be one of fp32, bf16, q8_0, q4_1, auto"),
    (dict(kv_cache_dtype="int8"), "unknown dtype 'int8'"),
    (dict(attention_backend="cpu", device="meta"), "attention_backend='cpu' needs the model on the CPU"),
])
def test_llm_refuses_bad_choices_before_loading(no_load, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM("embedded", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA-only choices are fine where CUDA is")
def test_llm_refuses_cuda_only_choices_without_cuda(no_load, monkeypatch):
    with pytest.raises(ValueError, match="sampler_backend='csrc' is the CUDA greedy kernel"):
        LLM("embedded", sampler_backend="csrc")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for name in ("attention_backend", "sampler_backend"):
        with pytest.raises(ValueError, match=f"{name}='triton' needs a CUDA device"):
            LLM("embedded", **{name: "triton"})


def test_auto_and_a_forced_path_build_and_serve(monkeypatch):
    """A real engine: "auto" is the best path (the same tokens as unset); a forced path this CPU
    has builds, serves, and is the one the ops run."""
    params = SamplingParams(n=2, temperature=0.8, max_tokens=5, seed=3, ignore_eos=True)

    def tokens() -> list[list[int]]:
        llm = LLM(small_model(), kv_cache_tokens=256, block_size=4)
        return [c.token_ids for c in llm.generate([[5, 6, 7, 8]], params)[0].outputs]

    monkeypatch.delenv(cpu_isa.ISA_ENV, raising=False)
    unset = tokens()
    monkeypatch.setenv(cpu_isa.ISA_ENV, "auto")
    assert tokens() == unset
    monkeypatch.setenv(cpu_isa.ISA_ENV, "scalar")
    assert cpu_ops.resolved_isa() == "scalar"
    assert [len(t) for t in tokens()] == [5, 5]
