"""The quantised CPU linear (rrm_kernels/quant_linear_cpu.py + rrm_kernels/csrc/quant_linear_cpu.cpp): the quantisers
against gguf's reference bytes, the op on every ISA path this CPU can run (each forced) against its
torch reference on fresh random inputs, and the clean fallback when the extension cannot build."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rrm_kernels import quant_linear_cpu as ql

REPO = Path(__file__).resolve().parents[2]


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block: scale 0
    if n > 1:
        w[1, :32] = 0.25  # a constant block: q4_1 range 0
    if n > 2 and k >= 64:
        w[2, 32:64] = -torch.rand(32, generator=g)  # a one-signed block
    return w


# ------------------------------------------------------------------------------ quantisers
@pytest.mark.parametrize("fmt", ql.FORMATS)
def test_quantize_matches_gguf_reference_bytes(fmt):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    w = _weights(37, 96, seed=1)
    qw = ql.quantize(w, fmt)
    gtype = getattr(GGMLQuantizationType, fmt.upper())
    expect = quantize(w.numpy(), gtype)
    assert torch.equal(ql.to_gguf_bytes(qw), torch.from_numpy(np.ascontiguousarray(expect)).view(torch.uint8))
    # and the way back: our dequantiser and block parser agree with gguf's
    assert torch.equal(ql.dequantize(qw), torch.from_numpy(dequantize(expect, gtype).astype(np.float32)))
    again = ql.from_gguf_bytes(torch.from_numpy(np.ascontiguousarray(expect)).view(torch.uint8), fmt)
    assert torch.equal(again.q, qw.q) and torch.equal(again.d, qw.d)
    assert (again.m is None) == (qw.m is None) and (qw.m is None or torch.equal(again.m, qw.m))


@pytest.mark.parametrize("fmt", ql.FORMATS)
def test_requantising_dequantised_blocks_is_lossless(fmt):
    qw = ql.quantize(_weights(20, 64, seed=2), fmt)
    again = ql.quantize(ql.dequantize(qw), fmt)
    assert torch.equal(ql.to_gguf_bytes(again), ql.to_gguf_bytes(qw))


def test_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 32"):
        ql.quantize(torch.randn(4, 40), "q8_0")
    with pytest.raises(ValueError, match="format"):
        ql.quantize(torch.randn(4, 32), "q5_k")


def test_pack_layout_record_sizes():
    for fmt in ql.FORMATS:
        pw = ql.PackedWeight.from_dense(torch.randn(17, 64), fmt)  # 2 groups of 16 columns, 2 blocks
        assert pw.nbytes == 2 * 2 * ql.RECORD_BYTES[fmt]
        assert ql.RECORD_BYTES[fmt] == ql.GROUP * ql.BYTES_PER_BLOCK[fmt]  # same bytes as the GGUF blocks


# ------------------------------------------------------------------------------ the op
def _isas() -> list[str]:
    try:
        have = ql.supported_isas()
    except Exception as e:  # the build itself is covered by test_extension_builds
        pytest.skip(f"extension unavailable: {e}")
    return have


@pytest.fixture(scope="module")
def have_isas() -> list[str]:
    return _isas()


def test_extension_builds_and_reports_isas():
    assert ql.available()
    isas = ql.supported_isas()
    assert isas[0] == "scalar" and set(isas) <= {"scalar", "avx2", "avx512"}


SHAPES = [(1, 16, 32), (3, 40, 96), (5, 7, 64), (8, 576, 576), (9, 200, 1536), (33, 48, 128)]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("fmt", ql.FORMATS)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=lambda v: str(v))
def test_op_matches_reference_on_every_isa(isa, fmt, m, n, k, have_isas):
    if isa not in have_isas:
        pytest.skip(f"this CPU has no {isa} path")
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    qw = ql.quantize(torch.randn(n, k, generator=g) * 0.05, fmt)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if n % 2 else None  # odd n: with bias
    y = ql.quant_linear(x, ql.PackedWeight.from_quantized(qw), bias, isa=isa)
    ref = ql.quant_linear_ref(x, qw, bias)
    scale = ref.abs().max().item()
    # same integer block sums; only the fp32 accumulation order differs
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5 * scale)
    # against the exact fp32 product with the dequantised weights: x's int8 blocks cost < 2% (Frobenius)
    exact = ql.quant_linear_ref(x, qw, bias, quantize_x=False)
    assert ((y - exact).norm() / exact.norm()).item() < 0.02


def test_isa_paths_agree_bit_for_bit_on_block_sums(have_isas):
    # integer dot products are exact on every path: results differ at most by fp32 rounding
    g = torch.Generator().manual_seed(7)
    for fmt in ql.FORMATS:
        pw = ql.PackedWeight.from_dense(torch.randn(64, 256, generator=g), fmt)
        x = torch.randn(6, 256, generator=g)
        ys = [ql.quant_linear(x, pw, isa=i) for i in have_isas]
        for y in ys[1:]:
            torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-5 * ys[0].abs().max().item())


@pytest.mark.parametrize("fmt,rows,parallel_min", [(f, 40, None) for f in ql.FORMATS] + [("q4_1", 3, 1)])
def test_threads_split_columns_without_changing_a_bit(fmt, rows, parallel_min):
    # 40 x 1696 x 576 multiply-adds: past the op's threshold (2^25), so 2 threads split the columns;
    # 3 rows with the threshold at 1 (what spinning threads get): split too. Every output element
    # is computed by one thread in one order either way
    g = torch.Generator().manual_seed(11)
    qw = ql.quantize(torch.randn(1696, 576, generator=g) * 0.05, fmt)
    pw = ql.PackedWeight.from_quantized(qw)
    x = torch.randn(rows, 576, generator=g)
    threads = torch.get_num_threads()
    old = ql.set_parallel_min(parallel_min) if parallel_min else None
    try:
        torch.set_num_threads(1)
        one = ql.quant_linear(x, pw)
        torch.set_num_threads(2)
        two = ql.quant_linear(x, pw)
    finally:
        torch.set_num_threads(threads)
        if old is not None:
            ql.set_parallel_min(old)
    assert torch.equal(one, two)
    ref = ql.quant_linear_ref(x, qw)
    torch.testing.assert_close(two, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_op_shapes_strides_and_dtypes(have_isas):
    g = torch.Generator().manual_seed(3)
    qw = ql.quantize(torch.randn(24, 64, generator=g), "q4_1")
    pw = ql.PackedWeight.from_quantized(qw)
    big = torch.randn(5, 100, generator=g)
    x = big[:, 10:74]  # unit stride along k, row stride 100
    torch.testing.assert_close(ql.quant_linear(x, pw), ql.quant_linear_ref(x, qw), rtol=1e-4, atol=1e-4)
    x3 = torch.randn(2, 3, 64, generator=g)  # leading dims
    assert ql.quant_linear(x3, pw).shape == (2, 3, 24)
    xt = torch.randn(64, 4, generator=g).t()  # stride along k != 1: copied first
    torch.testing.assert_close(ql.quant_linear(xt, pw), ql.quant_linear_ref(xt, qw), rtol=1e-4, atol=1e-4)
    xb = torch.randn(4, 64, generator=g).bfloat16()  # computed in fp32, returned in x's dtype
    assert ql.quant_linear(xb, pw).dtype == torch.bfloat16
    assert ql.quant_linear(torch.empty(0, 64), pw).shape == (0, 24)


def test_op_rejects_bad_inputs(have_isas):
    pw = ql.PackedWeight.from_dense(torch.randn(16, 64), "q8_0")
    with pytest.raises(ValueError, match="features"):
        ql.quant_linear(torch.randn(2, 32), pw)
    with pytest.raises(ValueError, match="isa"):
        ql.quant_linear(torch.randn(2, 64), pw, isa="neon")
    broken = ql.PackedWeight("q8_0", 16, 64, pw.data[:-1].contiguous())
    with pytest.raises(RuntimeError, match="packed holds"):
        ql.quant_linear(torch.randn(2, 64), broken)


def test_isa_forced_by_environment(monkeypatch):
    monkeypatch.setenv("RRM_CPU_ISA", "scalar")
    assert ql.default_isa() == "scalar"
    monkeypatch.setenv("RRM_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="RRM_CPU_ISA"):
        ql.default_isa()


def test_failed_build_falls_back_with_one_log_line(tmp_path, tiny_qwen2_dir):
    """A real failed build (no usable C++ compiler, empty extension cache): available() is False,
    one warning line says why, and LLM(weights='q4_1') serves the dense weights."""
    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING, format='%(message)s', stream=sys.stderr)\n"
            "import rrm_engine\n"
            "from rrm_kernels import quant_linear_cpu as ql\n"
            "print('available', ql.available())\n"
            f"llm = rrm_engine.LLM({str(tiny_qwen2_dir)!r}, device='cpu', weights='q4_1', kv_cache_tokens=64)\n"
            "print('served', llm.weights)\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RRM_CPU_ISA", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "available False" in out.stdout and "served fp32" in out.stdout
    lines = [ln for ln in out.stderr.splitlines() if "did not build" in ln]
    assert len(lines) == 1 and "falling back to dense weights" in lines[0], out.stderr[-3000:]
