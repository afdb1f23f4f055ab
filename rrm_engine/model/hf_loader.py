"""Checkpoint loading: a Hugging Face model dir (config.json + safetensors + tokenizer) into a Decoder.

The Decoder is built on the "meta" device (no storage), every checkpoint tensor is checked by
name and shape from the file headers before any data is read, and then the tensors are streamed
one at a time from the memory-mapped files onto the target device and dtype. The host never
holds a second full copy of the weights, and no partially loaded model is ever returned.

loader.load(name_or_path) is the front door (an HF dir, a .gguf, or "embedded"); this module reads
HF dirs and defines the LoadedModel that every loader returns.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .config import CheckpointError, ModelConfig
from ..layers.fused_linear import FusedLinear
from .decoder import Decoder
from ..placement import resolve_device, resolve_dtype

# Checkpoint entries that carry no parameter of ours: old checkpoints saved RoPE's inverse
# frequencies as buffers; we compute them from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults a checkpoint ships in generation_config.json (None: not specified).
    temperature is 0.0 when the file asks for greedy decoding (do_sample: false)."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None


class ShardPlan(Protocol):
    """One tensor-parallel rank's share of the checkpoint (distributed.tensor_parallel.RankShard):
    `shard` cuts an empty decoder down to this rank's shapes, `part` names the slice of each
    checkpoint tensor to read into it (and the zero rows to append: padded vocabulary slices)."""

    def shard(self, model: Decoder) -> None: ...

    def part(self, name: str, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], int]: ...


@dataclass
class LoadedModel:
    model: Decoder  # in eval mode, on the requested device and dtype
    tokenizer: Any  # a transformers tokenizer (with its chat template), or None if the dir has none
    config: ModelConfig
    eos_token_ids: tuple[int, ...]  # every token id that ends generation
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    name: str = ""
    bytes_read: int | None = None  # tensor bytes read from the checkpoint files (one rank's share when sharded)
    # how the checkpoint stores its linear weights: "fp32" / "bf16" / "fp16" (config.json's dtype),
    # "q8_0" / "q4_1" (a GGUF's blocks); None when unknown. weights="auto" keeps this precision.
    checkpoint_format: str | None = None


def load_hf(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32,
            name: str | None = None, shard: ShardPlan | None = None) -> LoadedModel:
    """Load a Hugging Face causal-LM dir: config.json, *.safetensors (one file or sharded with
    model.safetensors.index.json), tokenizer, and generation_config.json when present. With
    `shard`, the decoder is cut to one tensor-parallel rank's shapes while still empty and only
    that rank's slice of each tensor is read (safetensors get_slice)."""
    path = Path(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    raw = _read_json(path / "config.json", what="config.json")
    cfg = _model_config(raw)
    tensor_files = _tensor_files(path)
    model = _build_on_meta(cfg)
    # checkpoint names (fused projections appear as their separate parts) -> shape
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    found = _check_tensors(tensor_files, expected, cfg)
    if shard is not None:
        shard.shard(model)
    bytes_read = _stream_tensors(model, found, expected, device, dtype, shard)
    model.eval()
    gen_raw = _read_json(path / "generation_config.json", what="generation_config.json") \
        if (path / "generation_config.json").is_file() else {}
    tokenizer = _load_tokenizer(path)
    eos = _eos_token_ids(cfg, gen_raw, tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, eos_token_ids=eos,
                       generation=_generation_defaults(gen_raw), name=name or path.name, bytes_read=bytes_read,
                       checkpoint_format=_DTYPE_NAMES.get(raw.get("torch_dtype") or raw.get("dtype")))


_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _read_json(file: Path, what: str) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{what} not found in {file.parent}")
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {what} at {file}: {e}") from e


def _model_config(raw: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.from_hf(raw)
    except KeyError as e:
        raise CheckpointError(f"config.json lacks the field {e.args[0]!r}") from e


def _tensor_files(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint: the shards named in the index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, what="model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in {index.name} is missing from {path}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {path} (.bin / .pt checkpoints are not supported)")
    return files


def _build_on_meta(cfg: ModelConfig) -> Decoder:
    # the meta device allocates nothing: the real storage is each checkpoint tensor itself
    with torch.device("meta"):
        return Decoder(cfg)


def _open(file: Path):
    from safetensors import safe_open
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError (truncated, corrupt header) or OSError
        raise CheckpointError(f"{_safetensors_problem(file)} ({type(e).__name__}: {e})") from e


def _safetensors_problem(file: Path) -> str:
    """Say what is wrong with a safetensors file that safetensors refused, naming the first tensor
    whose bytes are missing when the file was cut short. The format: an 8-byte little-endian
    header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}}, the data."""
    try:
        return _safetensors_layout_problem(file)
    except Exception as e:  # the diagnosis must never hide the original error
        return f"corrupt or truncated safetensors file {file} ({type(e).__name__} while reading its header: {e})"


def _safetensors_layout_problem(file: Path) -> str:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated safetensors file {file}: {size} bytes, not even the header length"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return (f"truncated or corrupt safetensors file {file}: the header says {n} bytes of metadata, "
                    f"the file holds {size} bytes in all")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"corrupt safetensors file {file}: its header is not valid JSON ({e})"
    data = size - 8 - n
    cut = sorted((info["data_offsets"][1], name) for name, info in header.items()
                 if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][1] > data)
    if cut:
        end, name = cut[0]
        more = f" (and {len(cut) - 1} more after it)" if len(cut) > 1 else ""
        return (f"truncated safetensors file {file}: tensor {name}{more} runs past the end of the data "
                f"(it ends at data byte {end}, the file holds {data}); re-copy or re-download the file")
    return f"corrupt safetensors file {file}"


def _check_tensors(files: list[Path], expected: dict[str, tuple[int, ...]],
                   cfg: ModelConfig) -> dict[str, Path]:
    """Match checkpoint tensors to parameters by name and shape, reading only the headers.
    Returns parameter name -> file holding it."""
    found: dict[str, Path] = {}
    unexpected: list[str] = []
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                if key.endswith(_IGNORED_SUFFIXES):
                    continue
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # some tied checkpoints still save the (identical) head; the embedding serves
                if key not in expected:
                    unexpected.append(key)
                    continue
                if key in found:
                    raise CheckpointError(f"tensor {key} appears in both {found[key].name} and {file.name}")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise CheckpointError(
                        f"tensor {key} in {file.name} has shape {list(shape)}, the config needs {list(expected[key])}"
                    )
                found[key] = file
    if unexpected:
        raise CheckpointError(f"unexpected tensors in the checkpoint (wrong architecture?): {', '.join(sorted(unexpected))}")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"missing tensors in the checkpoint: {', '.join(missing)}")
    return found


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the meta parameter `name` by one holding `tensor` (no copy)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


def _stream_tensors(model: nn.Module, found: dict[str, Path], shapes: dict[str, tuple[int, ...]],
                    device: torch.device, dtype: torch.dtype, shard: ShardPlan | None = None) -> int:
    """Read every tensor (or this rank's slice of it) onto the device; returns the bytes read."""
    read = 0
    # a fused parameter is allocated whole first (this rank's rows of every part when sharded);
    # each checkpoint part is then copied into its rows
    for module_name, module in model.named_modules():
        if isinstance(module, FusedLinear):
            for leaf, p in list(module.named_parameters(recurse=False)):
                _assign(model, f"{module_name}.{leaf}", torch.empty(p.shape, device=device, dtype=dtype))
    targets = model.state_dict()  # checkpoint name -> meta parameter, or a view into a fused one
    by_file: dict[Path, list[str]] = {}
    for name, file in found.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                try:
                    if shard is None:
                        t = f.get_tensor(name)
                    else:
                        index, pad = shard.part(name, shapes[name])
                        t = f.get_slice(name)[index]
                except Exception as e:
                    raise CheckpointError(f"cannot read tensor {name} from {file.name}: {e}") from e
                read += t.numel() * t.element_size()
                if shard is not None and pad:  # the last vocabulary slice is padded to the others' size
                    t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
                # one tensor in flight: the host copy is dropped as soon as it sits on the device
                if targets[name].is_meta:
                    _assign(model, name, t.to(device=device, dtype=dtype))
                else:
                    targets[name].copy_(t)
                del t
    still_meta = [n for n, p in model.named_parameters() if p.is_meta] + \
                 [n for n, b in model.named_buffers() if b.is_meta]
    if still_meta:  # a bug of ours, not of the checkpoint: every parameter was matched above
        raise CheckpointError(f"parameters left unloaded: {', '.join(still_meta)}")
    return read


def _load_tokenizer(path: Path):
    """The dir's tokenizer via transformers (None when the dir has no tokenizer files)."""
    markers = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / m).is_file() for m in markers):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from e


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _eos_token_ids(cfg: ModelConfig, gen: dict[str, Any], tokenizer: Any) -> tuple[int, ...]:
    # generation_config.json is what transformers' generate() stops on; it often lists more
    # ids than config.json (e.g. <|im_end|> and <|endoftext|>). Fall back to config, then tokenizer.
    ids = _as_ids(gen.get("eos_token_id")) or list(cfg.eos_token_ids)
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return tuple(dict.fromkeys(ids))


def _generation_defaults(gen: dict[str, Any]) -> GenerationDefaults:
    temperature = gen.get("temperature")
    if gen.get("do_sample") is False:
        temperature = 0.0
    return GenerationDefaults(
        temperature=None if temperature is None else float(temperature),
        top_p=None if gen.get("top_p") is None else float(gen["top_p"]),
        top_k=None if gen.get("top_k") is None else int(gen["top_k"]),
        max_new_tokens=gen.get("max_new_tokens"),
    )
