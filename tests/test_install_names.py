"""No importable name of ours collides with another distribution's (transformers >= 5.25 imports
Hugging Face's `kernels`; this repo's kernel package once had that name and shadowed it from the
repo root). Checked the way users hit it: transformers' Qwen2 model, HF `kernels` (when installed)
and rrm_engine imported together from the repo root and from another directory, and a
non-editable `pip install .` into a fresh virtual environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUR_NAMES = {"rrm_engine", "rrm_kernels"}

# imports what transformers imports when a model loads, then ours; prints where each came from
PROBE = """
import importlib.util, json, sys
import rrm_engine, rrm_kernels, rrm_kernels.cpu_ops
from rrm_kernels import paged_decode_attention
from transformers import Qwen2Config, Qwen2ForCausalLM
import transformers.integrations.hub_kernels
m = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64))
spec = importlib.util.find_spec("kernels")
out = {"rrm_engine": rrm_engine.__file__, "rrm_kernels": rrm_kernels.__file__,
       "csrc": str(rrm_kernels.cpu_ops.CSRC_DIR), "csrc_ok": all(p.is_file() for p in rrm_kernels.cpu_ops.SOURCES),
       "kernels": spec.origin if spec else None, "bench": getattr(importlib.util.find_spec("bench"), "origin", "absent")}
if spec:
    import kernels
    out["kernels_has_hf_api"] = hasattr(kernels, "CUDAProperties") or hasattr(kernels, "kernelize")
print(json.dumps(out))
"""


def _probe(cwd: Path, python: str = sys.executable, extra_env: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra_env or {})
    result = subprocess.run([python, "-c", PROBE], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["repo root", "another directory"])
def test_transformers_hf_kernels_and_rrm_engine_import_together(where, tmp_path):
    cwd = ROOT if where == "repo root" else tmp_path
    got = _probe(cwd)
    engine_root = Path(got["rrm_engine"]).resolve().parent.parent
    if where == "repo root":
        assert engine_root == ROOT  # the cwd comes first
    assert Path(got["rrm_kernels"]).resolve().parent.parent == engine_root  # one install, both packages
    assert got["csrc_ok"], got
    if got["kernels"] is not None:  # HF kernels installed (transformers >= 5.25 brings it): it must be theirs
        assert not Path(got["kernels"]).resolve().is_relative_to(ROOT), got
        assert got["kernels_has_hf_api"], got


def test_bench_is_a_namespace_folder_that_never_shadows(tmp_path):
    """bench/ runs from the repo root (python -m bench.throughput) but has no __init__.py, so a
    regular package named `bench` anywhere on the path (PyPI has one) wins over it."""
    assert not (ROOT / "bench" / "__init__.py").exists()
    other = tmp_path / "bench"
    other.mkdir()
    (other / "__init__.py").write_text("WHO = 'other'\n")
    code = "import bench; print(getattr(bench, 'WHO', 'ours'))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert run.stdout.strip() == "other", run.stderr
    run = subprocess.run([sys.executable, "-c", "import bench.throughput"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.slow  # about a minute: builds the wheel in an isolated build environment
def test_non_editable_install_has_only_our_names(tmp_path):
    """pip install . (not editable) into a fresh venv that sees this environment's packages: the
    wheel installs rrm_engine and rrm_kernels (with the C++ sources) and nothing else at the top,
    no other installed distribution provides those names, and everything imports from elsewhere."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this environment's packages (torch, transformers, HF kernels, ...) after the venv's own
    (Path(site) / "test_env_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], capture_output=True,
                             text=True, timeout=600, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    dist_info = next(Path(site).glob("rrm_engine-*.dist-info"))
    tops = {line.split(",")[0].split("/")[0] for line in (dist_info / "RECORD").read_text().splitlines()}
    tops = {t for t in tops if not t.endswith(".dist-info") and t not in ("__pycache__", "..")}
    assert {t.removesuffix(".py") for t in tops} <= OUR_NAMES, tops
    assert (Path(site) / "rrm_kernels" / "csrc" / "cpu" / "vec.h").is_file()
    # who provides each of our names among everything this venv sees
    providers = subprocess.run([py, "-c", "import json, importlib.metadata as m; "
                                "print(json.dumps(m.packages_distributions()))"],
                               capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    for name in OUR_NAMES:
        others = {d for d in json.loads(providers).get(name, []) if d.replace("-", "_") != "rrm_engine"}
        assert not others, f"{name} is also provided by {others}"
    got = _probe(tmp_path, python=py)
    assert Path(got["rrm_engine"]).resolve().is_relative_to(Path(site).resolve()), got
    assert got["csrc_ok"] and Path(got["csrc"]).resolve().is_relative_to(Path(site).resolve()), got
    assert got["bench"] in (None, "absent") or not Path(str(got["bench"])).resolve().is_relative_to(Path(site).resolve())
