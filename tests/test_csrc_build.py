"""GPU code must keep compiling on machines without a GPU: the csrc/ .cu with nvcc for sm_90, the
torch binding (.cpp) with g++ against the installed torch headers, and the sampling / log-prob and
paged attention Triton kernels through Triton's real compiler for sm_90 (the CPU tests only run them
in the interpreter, which accepts programs the compiler rejects). On a machine with CUDA the csrc op is
also built and checked against its torch reference."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
CPP_FILES = sorted(CSRC.glob("*.cpp"))


def test_csrc_has_sources():
    assert CU_FILES and CPP_FILES


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    result = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-O3", "-std=c++17", str(source), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
@pytest.mark.parametrize("source", CPP_FILES, ids=lambda p: p.name)
def test_torch_binding_compiles_against_torch_headers(source):
    from torch.utils.cpp_extension import include_paths
    text = source.read_text()
    assert "ATen/cuda" not in text and "c10/cuda" not in text and "cuda_runtime" not in text, \
        "the binding must build against the CPU torch wheel: no CUDA headers"
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    result = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", *includes, "-DTORCH_EXTENSION_NAME=rrm_csrc",
                             str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def test_csrc_backend_rejects_non_greedy_batches_before_building():
    from kernels.sampling import sample
    b = 2
    args = (torch.randn(2, 10), torch.tensor([0, 1]), torch.ones(b), torch.zeros(b, dtype=torch.int32), torch.ones(b),
            torch.zeros(b), torch.zeros(b, dtype=torch.int64), torch.zeros(b, dtype=torch.int64))
    with pytest.raises(ValueError, match="all_greedy"):
        sample(*args, backend="csrc")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to build and run the extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 1000, 152064])
def test_greedy_argmax_lse_matches_reference_on_gpu(dtype, vocab):
    from kernels.csrc_ops import greedy_argmax_lse, greedy_argmax_lse_ref
    gen = torch.Generator(device="cuda").manual_seed(vocab)
    logits = (torch.randn(5, vocab, device="cuda", generator=gen) * 4).to(dtype)
    logits[1, : vocab // 2] = float("-inf")
    logits[2, 3] = logits[2, vocab - 1] = logits[2].float().max() + 1  # exact tie: first index wins
    rows = torch.tensor([4, 1, 2, 0, 2, 3], device="cuda")
    for splits in (1, 3, None):
        tokens, lp = greedy_argmax_lse(logits, rows, splits)
        ref_tokens, ref_lp = greedy_argmax_lse_ref(logits, rows)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(lp, ref_lp, rtol=1e-4, atol=1e-4)


TRITON_SM90_PROBE = textwrap.dedent("""
    import subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    from kernels.paged_decode import _decode_split_kernel, decode_tile
    from kernels.paged_prefill import _prefill_kernel, prefill_tile
    from kernels.sampling import _sample_kernel
    from kernels.selective_log_softmax import _token_logprob_kernel
    from kernels.shared_prefix_decode import _prefix_pass_kernel, prefix_tile

    sample_sig = dict(logits_ptr="*bf16", stride_row="i64", row_index_ptr="*i64", temperature_ptr="*fp32",
                      top_k_ptr="*i32", top_p_ptr="*fp32", min_p_ptr="*fp32", seeds_ptr="*i64", offsets_ptr="*i64",
                      tokens_ptr="*i64", logprobs_ptr="*fp32", status_ptr="*i32", B="i32", V="i32")
    logprob_sig = dict(logits_ptr="*bf16", stride_row="i64", labels_ptr="*i64", out_ptr="*fp32", lse_ptr="*fp32",
                       V="i32", inv_t="fp32", ignore_index="i32")
    # paged attention in bf16 with 16-token pages; every argument not named here is an int32 stride/length
    def attn_sig(names, **typed):
        return {n: typed.get(n, "i32") for n in names.split()}
    decode_sig = attn_sig("Q K V BT KV_START SEQ_LENS O LSE scale_log2 stride_qb stride_qh stride_kb stride_kt "
                          "stride_kh stride_vb stride_vt stride_vh stride_btb stride_op stride_ob stride_oh stride_lp "
                          "stride_lb split_len", Q="*bf16", K="*bf16", V="*bf16", BT="*i32", KV_START="*i32",
                          SEQ_LENS="*i32", O="*fp32", LSE="*fp32", scale_log2="fp32")
    prefill_sig = attn_sig("Q K V BT QSL SEQ_LENS O scale_log2 stride_qt stride_qh stride_kb stride_kt stride_kh "
                           "stride_vb stride_vt stride_vh stride_btb stride_ot stride_oh", Q="*bf16", K="*bf16",
                           V="*bf16", BT="*i32", QSL="*i32", SEQ_LENS="*i32", O="*bf16", scale_log2="fp32")
    prefix_sig = attn_sig("Q K V GBT GLENS MEMBERS MEMBER_START O LSE scale_log2 stride_qb stride_qh stride_kb "
                          "stride_kt stride_kh stride_vb stride_vt stride_vh stride_gbt stride_op stride_ob stride_oh "
                          "stride_lp stride_lb split_len", Q="*bf16", K="*bf16", V="*bf16", GBT="*i32", GLENS="*i32",
                          MEMBERS="*i32", MEMBER_START="*i32", O="*fp32", LSE="*fp32", scale_log2="fp32")
    # (kernel, signature, constexprs, num_warps, num_stages as launched): the sampler and logprob kernels at their launch config,
    # every attention kernel at its default tile for SmolLM2-135M (g=3, d=64) and RRM-7B (g=7, d=128)
    jobs = [
        (_sample_kernel, sample_sig, dict(GREEDY_ONLY=False, BLOCK_B=1, BLOCK=2048, SEARCH_BLOCK=256, NUM_PROBES=16), 8, 3),
        (_sample_kernel, sample_sig, dict(GREEDY_ONLY=True, BLOCK_B=1, BLOCK=2048, SEARCH_BLOCK=256, NUM_PROBES=16), 8, 3),
        (_token_logprob_kernel, logprob_sig, dict(BLOCK=4096), 8, 3),
    ]
    for group, d in ((3, 64), (7, 128)):
        attn = dict(HEAD_DIM=d, D_PAD=d, PAGE=16, DOT_PRECISION="tf32", GROUP=group)
        t = decode_tile(16)
        jobs.append((_decode_split_kernel, decode_sig,
                     dict(attn, G_PAD=16, BLOCK_N=t.block_n, HAS_START=True, DIRECT=False), t.num_warps, 3))
        t = prefix_tile(group, d, 16)
        jobs.append((_prefix_pass_kernel, prefix_sig, dict(attn, BLOCK_M=t.block_m, BLOCK_N=t.block_n), t.num_warps, 3))
        for rows in (16, 2048 * group):  # a short extend and a long prompt
            t = prefill_tile(d, rows)
            jobs.append((_prefill_kernel, prefill_sig, dict(attn, BLOCK_M=t.block_m, BLOCK_N=t.block_n), t.num_warps, 2))
    pt = get_ptxas(90)
    for fn, sig, consts, warps, stages in jobs:
        sig = dict(sig, **{name: "constexpr" for name in consts})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(k.asm["ptx"]); f.flush()
            r = subprocess.run([getattr(pt, "path", pt), "-v", "-arch=sm_90a", f.name, "-o", f.name + ".cubin"],
                               capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "0 bytes spill stores" in r.stderr, (fn.__name__, consts, warps, r.stderr)
        print(fn.__name__, consts, r.stderr.strip().splitlines()[-2])
""")


def test_triton_kernels_compile_for_sm90_without_spills():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90)
    except Exception as e:  # no NVIDIA backend / ptxas in this Triton install
        pytest.skip(f"Triton's NVIDIA backend is not usable here: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    env["PYTHONPATH"] = str(CSRC.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", TRITON_SM90_PROBE], capture_output=True, text=True, env=env,
                            cwd=CSRC.parent)
    assert result.returncode == 0, result.stderr[-4000:]
