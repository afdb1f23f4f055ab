"""Device and dtype as users spell them, checked with a clear message before any weight is read;
and the one deliberately refused prompt shape, generate([42])."""
from __future__ import annotations

import pytest
import torch

from rrm_engine import LLM, SamplingParams
from rrm_engine.placement import resolve_device, resolve_dtype


@pytest.mark.parametrize("spec,want", [
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("BF16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    ("float32", torch.float32), ("fp32", torch.float32), ("float", torch.float32),
    ("float16", torch.float16), ("fp16", torch.float16), ("half", torch.float16),
    (torch.bfloat16, torch.bfloat16), (None, torch.float32), ("auto", torch.float32),
])
def test_dtype_names(spec, want):
    assert resolve_dtype(spec, "cpu") == want


@pytest.mark.parametrize("spec,message", [("int8", "unknown dtype 'int8'"), ("bfloat", "unknown dtype"),
                                          (torch.int64, "not a weight dtype"), (3, "must be a torch.dtype or a string")])
def test_bad_dtypes(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_dtype(spec, "cpu")


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda")
    for spec, message in (("gpu", "unknown device 'gpu'"), ("meta", "not supported"), ("cuda:x", "unknown device")):
        with pytest.raises(ValueError, match=message):
            resolve_device(spec)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:  # the CPU wheel: torch would raise an AssertionError from deep inside .to()
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="no CUDA support|sees no CUDA device") as e:
                resolve_device(spec)
            assert "use device cpu" in str(e.value)


def test_llm_takes_dtype_strings_and_checks_the_device(tiny_qwen2_dir):
    llm = LLM(tiny_qwen2_dir, device="cpu", dtype="bf16", kv_cache_tokens=256)
    assert next(llm.engine.model.parameters()).dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' was asked for"):
            LLM(tiny_qwen2_dir, device="cuda")


def test_generate_refuses_a_flat_list_of_ints(tiny_qwen2_dir):
    """generate([42, 7]) reads as one token-id prompt or as a list of prompts gone wrong: refused with
    the spelling that works; [[42, 7]] is one token-id prompt."""
    llm = LLM(tiny_qwen2_dir, device="cpu", kv_cache_tokens=256)
    params = SamplingParams(temperature=0, max_tokens=2)
    with pytest.raises(TypeError, match=r"flat list of 1 int.*\[\[42, 7\]\]"):
        llm.generate([42], params)
    (out,) = llm.generate([[42, 7]], params)
    assert out.prompt_token_ids == [42, 7] and len(out.outputs[0].token_ids) == 2
