"""GGUF checkpoints (llama.cpp's format): dequantize once into a cached Hugging Face dir.

The first load of a .gguf file converts it: tensors are dequantized with the `gguf` package and
renamed to the HF layout, the q/k row permutation of llama.cpp is undone, config.json is built
from the GGUF metadata and the tokenizer (with its chat template) is rebuilt by transformers. The
result lands under the cache dir (RRM_ENGINE_CACHE, else ~/.cache/rrm_engine) keyed by the file's
content hash, so every later load is a plain `load_hf` of safetensors.

Weights are stored in fp32: a dequantized value (fp16 scale x small integer + fp16 offset) is
exact in fp32 and not always in bf16/fp16, and the cast to the run dtype happens at load.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import CheckpointError
from .hf_loader import LoadedModel, load_hf

# Bump when the converted layout changes, so stale caches are not reused.
CONVERTER_VERSION = 1
SHARD_BYTES = 256 * 2**20  # bounds host memory during conversion to about one shard

# GGUF architecture -> (HF architecture, q/k rows permuted by convert_hf_to_gguf for interleaved RoPE)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def cache_root() -> Path:
    env = os.environ.get("RRM_ENGINE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rrm_engine"


def load_gguf(file: str | os.PathLike, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, shard: Any = None) -> LoadedModel:
    """Load a Llama/Qwen2 GGUF: convert it once into the cache, then load that HF dir (only one
    tensor-parallel rank's slices with `shard`, a loader.ShardPlan)."""
    file = Path(file)
    out_dir = converted_dir(file)
    loaded = load_hf(out_dir, device=device, dtype=dtype, name=file.stem, shard=shard)
    if loaded.tokenizer is not None and tokenizer_problem(loaded.tokenizer, file) is not None:
        # a conversion cached by a transformers that rebuilt this tokenizer wrongly: rebuild it now
        loaded.tokenizer = _gguf_tokenizer(file)
        loaded.tokenizer.save_pretrained(str(out_dir))
    loaded.checkpoint_format = linear_block_format(file)
    return loaded


def tokenizer_problem(tok: Any, file: Path) -> str | None:
    """What is wrong with a tokenizer rebuilt from `file` by transformers, or None. Some transformers
    versions rebuild a GGUF's byte-level BPE tokenizer wrongly (5.0-5.17: spaces and newlines become
    <|endoftext|>; 4.x: a BOS the GGUF says not to add; docs/DEPENDENCIES.md). A wrong tokenizer
    changes every prompt and so every reward, silently: refuse it instead."""
    probe = "Hello world\n  a\tb, café"
    ids = list(tok(probe, add_special_tokens=False)["input_ids"])
    back = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    special = set(getattr(tok, "all_special_ids", []) or [])
    if back != probe or special & set(ids):
        return f"plain text does not round-trip ({probe!r} -> {ids[:12]} -> {back!r})"
    add_bos = _Metadata(read_gguf(file)).get("tokenizer.ggml.add_bos_token")
    if add_bos is False and list(tok("Hello")["input_ids"]) != list(tok("Hello", add_special_tokens=False)["input_ids"]):
        return "it adds a BOS token that the GGUF says not to add (tokenizer.ggml.add_bos_token = false)"
    return None


def _gguf_tokenizer(file: Path) -> Any:
    """The tokenizer of a GGUF, as this transformers rebuilds it, checked (CheckpointError if wrong)."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    problem = tokenizer_problem(tok, file)
    if problem is not None:
        raise CheckpointError(f"transformers {transformers.__version__} rebuilds the tokenizer of {file.name} wrongly: "
                              f"{problem}. Install transformers>=5.18 (docs/DEPENDENCIES.md), or give a model dir that "
                              "ships its own tokenizer files")
    return tok


def linear_block_format(file: str | os.PathLike) -> str | None:
    """"q8_0" / "q4_1" when every 2-D weight of the decoder layers is stored in that GGUF block type
    (read from the header; the data stays on disk), else None."""
    from gguf import GGMLQuantizationType, GGUFReader
    names = {GGMLQuantizationType.Q8_0: "q8_0", GGMLQuantizationType.Q4_1: "q4_1"}
    types = {t.tensor_type for t in GGUFReader(str(file)).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    return names.get(types.pop()) if len(types) == 1 else None


def converted_dir(file: str | os.PathLike) -> Path:
    """The cached HF dir of a GGUF file, converting it first if needed. Safe against concurrent
    converters: each builds in a private temp dir and renames it into place atomically."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"GGUF file not found: {file}")
    target = cache_root() / f"{file.stem}-{_content_hash(file)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"rrm_engine: first load of {file.name}: converting it once into {target} "
          "(fp32 safetensors, several times the size of a quantised .gguf; later loads read it directly)",
          file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf(file, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # a concurrent converter won the race otherwise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _content_hash(file: Path) -> str:
    h = hashlib.sha256(f"rrm_engine-gguf-v{CONVERTER_VERSION}".encode())
    with open(file, "rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()[:16]


def convert_gguf(file: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write config.json, generation_config.json, safetensors shards (+ index) and, when the GGUF
    carries one, the tokenizer into out_dir."""
    file, out_dir = Path(file), Path(out_dir)
    reader = read_gguf(file)
    meta = _Metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    config = _hf_config(meta, arch, {t.name for t in reader.tensors}, reader)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    _write_tensors(reader, arch, config, out_dir)
    if meta.get("tokenizer.ggml.model") is not None:
        _gguf_tokenizer(file).save_pretrained(str(out_dir))


def read_gguf(file: Path) -> Any:
    """gguf's GGUFReader over `file`, with a truncated or corrupt file named as such (and the first
    tensor whose bytes are missing), not as the numpy reshape error gguf raises for it."""
    from gguf import GGUFReader

    class CheckedReader(GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            _check_tensor_extents(file, len(self.data), start_offs, fields)
            super()._build_tensors(start_offs, fields)

    size = file.stat().st_size
    try:
        return CheckedReader(str(file))
    except CheckpointError:
        raise
    except Exception as e:
        if "magic" in str(e).lower():
            raise CheckpointError(f"{file} is not a GGUF file (it does not start with the GGUF magic)") from e
        # the header or the tensor table ran past the end of the file, or holds impossible values
        raise CheckpointError(f"truncated or corrupt GGUF file {file} ({size} bytes): its header or tensor table "
                              f"cannot be read ({type(e).__name__}: {e})") from e


def _check_tensor_extents(file: Path, size: int, start: int, fields: list) -> None:
    """Raise naming the first tensor whose data lies past the end of the file. `fields` are gguf's
    tensor-info records (name, dims, type, offset); when a future gguf lays them out differently the
    check steps aside and gguf's own error stands."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
        for f in fields:
            _, name, _, dims, raw_type, offset = f.parts
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
            end = start + int(offset[0]) + int(np.prod(dims)) * type_size // block
            if end > size:
                raise CheckpointError(
                    f"truncated GGUF file {file}: tensor {bytes(name).decode('utf-8', 'replace')} ends at byte {end}, "
                    f"the file has {size} bytes; re-copy or re-install the file")
    except CheckpointError:
        raise
    except Exception:
        return


class _Metadata:
    def __init__(self, reader: Any):
        self.fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks {key}")
        return value


def _hf_config(meta: _Metadata, arch: str, tensor_names: set[str], reader: Any) -> dict[str, Any]:
    hf_arch, _ = ARCHITECTURES[arch]
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"GGUF rope scaling {scaling!r} is not supported (only default RoPE)")
    heads = int(meta.need(f"{arch}.attention.head_count"))
    hidden = int(meta.need(f"{arch}.embedding_length"))
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return {
        "architectures": [hf_arch],
        "model_type": arch,
        # the embedding's rows are the truth; vocab_size metadata is optional in GGUF
        "vocab_size": int(meta.get(f"{arch}.vocab_size", int(embed.shape[-1]))),
        "hidden_size": hidden,
        "intermediate_size": int(meta.need(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.need(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", hidden // heads))),
        "rms_norm_eps": float(meta.need(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise CheckpointError(f"unexpected GGUF tensor {gguf_name}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's q/k permutation. It turned HF's half-split RoPE layout (the two
    halves of each head) into llama.cpp's interleaved pairs: rows (head, half, i) -> (head, i, half)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tensors(reader: Any, arch: str, config: dict[str, Any], out_dir: Path) -> None:
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    _, permuted = ARCHITECTURES[arch]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shards = 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        shards.append((f"model-{len(shards) + 1:05d}.safetensors", list(shard)))
        save_file(shard, str(out_dir / shards[-1][0]), metadata={"format": "pt"})
        shard, shard_bytes = {}, 0

    from tqdm.auto import tqdm
    for t in tqdm(reader.tensors, desc="converting", unit="tensor", leave=False, disable=None):  # None: on a TTY
        name = hf_name(t.name)
        # GGUF lists dims innermost first (ne order); reversed, they are HF's [out, in]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if permuted and kind in heads:
            w = unpermute_rows(w, heads[kind])
        shard[name] = torch.from_numpy(np.array(w, copy=True))  # own the data: w may view the mmap
        shard_bytes += w.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    weight_map = {name: file for file, names in shards for name in names}
    index = {"metadata": {"total_size": sum((out_dir / f).stat().st_size for f, _ in shards)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
