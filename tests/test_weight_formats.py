"""LLM(weights=...): the serving linears in bf16 / Q8_0 / Q4_1 against the fp32 decoder; the embedded
GGUF's own blocks kept exactly; 'auto' resolution; what refuses a converted decoder."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import rrm_engine as rrm
from rrm_kernels import quant_linear_cpu as ql
from rrm_engine.layers import weight_formats as wf
from rrm_engine.model.loader import load_hf

def _teacher_forced_logits(decoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return decoder.compute_logits(decoder(ids, torch.arange(ids.shape[1])[None]))[0]


needs_op = pytest.mark.skipif(not ql.available(), reason="the quantised CPU op did not build here")


# ------------------------------------------------------------------------------ the embedded model
def _serving_module(hf_tensor: str) -> str:
    """The module that serves a checkpoint tensor: the fused projection for q/k/v and gate/up."""
    if hf_tensor == "model.embed_tokens.weight":
        return "head"  # tied: the LM head's own quantised copy
    module = hf_tensor.rsplit(".", 1)[0]
    parent, leaf = module.rsplit(".", 1)
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"}
    return f"{parent}.{fused.get(leaf, leaf)}"


@needs_op
def test_embedded_q4_1_serves_the_gguf_blocks_exactly(embedded_path, embedded_dir):
    """weights='auto' on the embedded GGUF serves Q4_1 (head Q8_0), and every packed weight is the
    file's own blocks (q/k rows un-permuted as the loader does), not a re-rounding of them."""
    from gguf import GGUFReader

    from rrm_engine.model.gguf_loader import hf_name, unpermute_rows

    llm = rrm.LLM(str(embedded_path), weights="auto", kv_cache_tokens=64)
    assert llm.weights == "q4_1" and llm.loaded.checkpoint_format == "q4_1"
    dec = llm.loaded.model
    cfg = dec.cfg
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    # the file's blocks per module: q/k/v and gate/up stacked by rows as the fused projections are
    parts: dict[str, list] = {}
    for t in GGUFReader(str(embedded_path)).tensors:
        if t.tensor_type.name not in ("Q4_1", "Q8_0"):
            continue
        raw = np.array(t.data, copy=True)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads:
            raw = unpermute_rows(raw, heads[kind])
        parts.setdefault(_serving_module(hf_name(t.name)), []).append((hf_name(t.name), t.tensor_type.name.lower(), raw))
    checked = 0
    for module_name, found in parts.items():
        module = dec.head if module_name == "head" else dec.get_submodule(module_name)
        order = [f"{module_name.rsplit('.', 1)[0]}.{p}.weight" for p in module.part_names] or [found[0][0]]
        by_name = {name: (fmt, raw) for name, fmt, raw in found}
        assert {fmt for fmt, _ in by_name.values()} == {module.fmt}, module_name
        raw = torch.from_numpy(np.concatenate([by_name[n][1] for n in order]))
        assert torch.equal(module.packed, ql.pack(ql.from_gguf_bytes(raw, module.fmt))), module_name
        checked += len(order)
    assert checked == 7 * cfg.num_layers + 1


@pytest.fixture(scope="module")
def greedy_path(embedded_model):
    """A chat prompt and the fp32 decoder's own greedy continuation (96 tokens) of it."""
    tok = embedded_model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Which answer is better? Answer 1: Paris is the "
                                       "capital of France. Answer 2: Berlin is the capital of France. Think step "
                                       "by step."}], tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt)
    llm = rrm.LLM(embedded_model, kv_cache_tokens=512)
    out = llm.generate([ids], rrm.SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True))[0]
    return torch.tensor([ids + list(out.outputs[0].token_ids)]), len(ids)


@needs_op
@pytest.mark.parametrize("fmt,min_agree,max_rel", [("q4_1", 0.93, 0.06), ("q8_0", 0.93, 0.08), ("bf16", 0.93, 0.03)])
def test_embedded_decoder_against_fp32(fmt, min_agree, max_rel, embedded_model, embedded_dir, greedy_path):
    """Teacher-forced along the fp32 decoder's greedy path: the greedy agreement rate (the served
    decoder's argmax = fp32's next token) and the relative (Frobenius) logit error there.
    Measured 2026-12-01, 200 greedy tokens after two chat prompts: q4_1 98% / 98%, 3.4-3.5% error (its
    weights are exact, the error is x's int8 blocks); q8_0 (re-rounded from the Q4_1 values) 97% / 99%,
    3.9-5.6%; bf16 100% / 97.5%, 1.1-1.2%."""
    ids, n_prompt = greedy_path
    ref = _teacher_forced_logits(embedded_model.model, ids)[n_prompt - 1:-1]
    assert torch.equal(ref.argmax(-1), ids[0, n_prompt:])  # it is the fp32 greedy path
    served = load_hf(embedded_dir, device="cpu", dtype=torch.float32)
    assert "weights " + fmt in wf.apply(served.model, fmt)
    got = _teacher_forced_logits(served.model, ids)[n_prompt - 1:-1]
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert agree >= min_agree, (agree, rel)
    assert rel <= max_rel, (agree, rel)


# ------------------------------------------------------------------------------ the tiny model
@needs_op
@pytest.mark.parametrize("fmt", wf.BLOCK_FORMATS)
def test_tiny_decoder_equals_fp32_with_the_same_weights_up_to_x_blocks(fmt, tiny_qwen2_dir):
    """The module swap itself (q/k/v biases, untied head, every linear): against an fp32 decoder whose
    weights are the dequantised blocks, the only difference left is x's int8 blocks."""
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    served = load_hf(tiny_qwen2_dir, device="cpu", dtype=torch.float32)
    ref = copy.deepcopy(served.model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, torch.nn.Linear):
                head = name == "lm_head"
                m.weight.copy_(ql.dequantize(ql.quantize(m.weight, wf.HEAD_FORMAT[fmt] if head else fmt)))
    wf.apply(served.model, fmt)
    assert isinstance(served.model.lm_head, wf.QuantizedLinear) and served.model.head is served.model.lm_head
    qkv = served.model.model.layers[0].self_attn.qkv_proj
    assert qkv.bias is not None and qkv.part_names == ("q_proj", "k_proj", "v_proj")
    got, want = _teacher_forced_logits(served.model, ids), _teacher_forced_logits(ref, ids)
    assert ((got - want).norm() / want.norm()).item() < 0.02
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9


@needs_op
def test_llm_generates_with_each_format(tiny_qwen2_dir):
    sp = rrm.SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True)
    prompt = list(range(5, 25))
    for fmt in ("fp32", "bf16", "q8_0", "q4_1"):
        llm = rrm.LLM(str(tiny_qwen2_dir), device="cpu", weights=fmt, kv_cache_tokens=256)
        assert llm.weights == fmt
        out = llm.generate([prompt], sp)[0]
        assert [len(c.token_ids) for c in out.outputs] == [6, 6]
        assert out.outputs[0].token_ids == out.outputs[1].token_ids  # greedy: both samples alike


def test_weights_none_keeps_the_loaded_format_and_a_second_conversion_is_refused(tiny_qwen2_dir):
    loaded = load_hf(tiny_qwen2_dir, device="cpu", dtype=torch.float32)
    first = rrm.LLM(loaded, weights="bf16", kv_cache_tokens=64)
    assert first.weights == "bf16"
    assert rrm.LLM(loaded, kv_cache_tokens=64).weights == "bf16"  # weights=None: as it is now
    assert rrm.LLM(loaded, weights="bf16", kv_cache_tokens=64).weights == "bf16"
    with pytest.raises(ValueError, match="already serves bf16"):
        rrm.LLM(loaded, weights="q8_0", kv_cache_tokens=64)


def test_training_refuses_a_converted_decoder(tiny_qwen2_dir):
    from rrm_engine.train.trainer import GRPOTrainer, TrainConfig
    loaded = load_hf(tiny_qwen2_dir, device="cpu", dtype=torch.float32)
    wf.apply(loaded.model, "bf16")
    with pytest.raises(ValueError, match="training needs the fp32/bf16 parameters"):
        GRPOTrainer(loaded.model, loaded.tokenizer, None, None, TrainConfig())


# ------------------------------------------------------------------------------ resolution
def test_resolve_auto_and_refusals(monkeypatch):
    cpu, cuda, f32, bf16 = torch.device("cpu"), torch.device("cuda"), torch.float32, torch.bfloat16
    assert wf.resolve("auto", cpu, "q4_1", f32) == "q4_1"
    assert wf.resolve("auto", cpu, "q8_0", f32) == "q8_0"
    assert wf.resolve("auto", cpu, "fp32", f32) == "fp32"
    assert wf.resolve("auto", cpu, None, f32) == "fp32"
    monkeypatch.setattr(wf, "cpu_has_native_bf16", lambda: True)
    assert wf.resolve("auto", cpu, "bf16", f32) == "bf16"  # a bf16 checkpoint loses nothing in bf16
    monkeypatch.setattr(wf, "cpu_has_native_bf16", lambda: False)
    assert wf.resolve("auto", cpu, "bf16", f32) == "fp32"  # emulated bf16 is slower than fp32
    assert wf.resolve("auto", cuda, "q4_1", bf16) == "bf16"  # GPU: the run dtype, Triton path untouched
    assert wf.resolve("q8_0", cpu, None, f32) == "q8_0"
    with pytest.raises(ValueError, match="CPU option"):
        wf.resolve("q4_1", cuda, "q4_1", bf16)
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        wf.resolve("fp32", cpu, None, bf16)
    with pytest.raises(ValueError, match="weights must be one of"):
        wf.resolve("int4", cpu, None, f32)


@needs_op
def test_cli_weights_flag_reaches_the_engine(tiny_qwen2_dir):
    from rrm_engine.cli import main as cli
    p = cli.build_parser()
    args = p.parse_args(["demo", "--model", str(tiny_qwen2_dir), "--device", "cpu", "--weights", "q8_0", "--quiet"])
    assert cli.make_judge(args).llm.weights == "q8_0"
    assert p.parse_args(["demo"]).weights is None
    with pytest.raises(SystemExit):
        p.parse_args(["demo", "--weights", "int3"])
