"""The defaults a newcomer meets are the fast ones where nothing is lost (issue 21, item 6): a Q4_1/Q8_0
.gguf that LLM loads itself (the embedded model, the CLI's default) is served from the file's own
blocks (weights="auto"; tests/test_weight_formats.py checks they are exactly the GGUF's), while a
LoadedModel passed in, which is what a trainer hands its engine, keeps its trainable parameters."""
from __future__ import annotations

import pytest

import rrm_engine as rrm
from rrm_engine.layers.weight_formats import is_serving_only


@pytest.fixture(scope="module")
def quant_op():
    from rrm_kernels import quant_linear_cpu
    if not quant_linear_cpu.available():
        pytest.skip("the quantised CPU linear op does not build here (the default then serves dense weights)")


def test_a_gguf_checkpoint_is_served_from_its_own_blocks(quant_op, embedded_path):
    llm = rrm.LLM("embedded", kv_cache_tokens=64)
    assert llm.weights == "q4_1" and is_serving_only(llm.loaded.model)
    out = llm.generate(["The capital of France is"], rrm.SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4
    # the exact fp32 reference stays one keyword away
    assert rrm.LLM(str(embedded_path), kv_cache_tokens=64, weights="fp32").weights == "fp32"


def test_a_loaded_model_and_a_dense_checkpoint_keep_their_weights(embedded_model, tiny_qwen2_dir):
    """EngineSampler.around(loaded) (train/engine_sampler.py) builds LLM(model=loaded): the decoder it
    trains must keep its parameters; an HF checkpoint keeps the run dtype."""
    assert rrm.LLM(embedded_model, kv_cache_tokens=64).weights == "fp32"
    assert not is_serving_only(embedded_model.model)
    assert rrm.LLM(str(tiny_qwen2_dir), device="cpu", kv_cache_tokens=64).weights == "fp32"
