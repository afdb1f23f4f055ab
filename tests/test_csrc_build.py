"""GPU code must keep compiling on machines without a GPU: the rrm_kernels/csrc/ .cu with nvcc for sm_90, the
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
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "rrm_kernels" / "csrc"
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


@pytest.fixture(scope="module")
def binding_syntax_checks() -> dict[Path, tuple[int, str]]:
    """g++ -fsyntax-only of every .cpp against the installed torch headers, all started at once
    (each takes ~20 s of one core): {source: (return code, stderr)}."""
    from torch.utils.cpp_extension import include_paths
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    procs = {src: subprocess.Popen(["g++", "-std=c++20", "-fsyntax-only", *includes, "-DTORCH_EXTENSION_NAME=rrm_csrc",
                                    str(src)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for src in CPP_FILES}
    results = {}
    for src, p in procs.items():
        err = p.communicate()[1]  # waits for this one; the others go on compiling meanwhile
        results[src] = (p.returncode, err)
    return results


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
@pytest.mark.parametrize("source", CPP_FILES, ids=lambda p: p.name)
def test_torch_binding_compiles_against_torch_headers(source, binding_syntax_checks):
    text = source.read_text()
    assert "ATen/cuda" not in text and "c10/cuda" not in text and "cuda_runtime" not in text, \
        "the binding must build against the CPU torch wheel: no CUDA headers"
    returncode, stderr = binding_syntax_checks[source]
    assert returncode == 0, stderr[-4000:]


def test_csrc_backend_rejects_non_greedy_batches_before_building():
    from rrm_kernels.sampling import sample
    b = 2
    args = (torch.randn(2, 10), torch.tensor([0, 1]), torch.ones(b), torch.zeros(b, dtype=torch.int32), torch.ones(b),
            torch.zeros(b), torch.zeros(b, dtype=torch.int64), torch.zeros(b, dtype=torch.int64))
    with pytest.raises(ValueError, match="all_greedy"):
        sample(*args, backend="csrc")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to build and run the extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 1000, 152064])
def test_greedy_argmax_lse_matches_reference_on_gpu(dtype, vocab):
    from rrm_kernels.csrc_ops import greedy_argmax_lse, greedy_argmax_lse_ref
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


def test_triton_kernels_compile_for_sm90_without_spills():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90)
    except Exception as e:  # no NVIDIA backend / ptxas in this Triton install
        pytest.skip(f"Triton's NVIDIA backend is not usable here: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # every kernel at its launch config, attention at its default tile for both model shapes
    result = subprocess.run([sys.executable, "-m", "bench.ptxas_report"], capture_output=True, text=True, env=env,
                            cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert result.stdout.count("\n") > 10, result.stdout  # the header and every kernel's line
