"""Training checkpoints: the model as a Hugging Face dir (config.json + model.safetensors + tokenizer
files, loadable by transformers' AutoModelForCausalLM and by rrm_engine.model.loader), plus
trainer_state.pt with what resuming needs (optimizer, step, RNG states, data position). The
optimizer state is the bulk of a checkpoint; it can be kept in bf16 or left out
(optimizer_state_for_saving).

A checkpoint is written to a temporary sibling dir and renamed into place, so a crash while
saving never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..model.config import ModelConfig
from ..model.decoder import Decoder

TRAINER_STATE = "trainer_state.pt"

_MODEL_TYPES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3",
                "MistralForCausalLM": "mistral"}


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for our ModelConfig (the inverse of ModelConfig.from_hf)."""
    d: dict[str, Any] = {
        "architectures": [cfg.architecture],
        "model_type": _MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if cfg.architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        d["attention_bias"] = cfg.qkv_bias
    if cfg.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        d["use_sliding_window"] = False
        d["sliding_window"] = None
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        d["eos_token_id"] = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids)
    return d


def save_model(model: Decoder, out: str | Path, tokenizer: Any = None) -> None:
    """The model alone, as a Hugging Face dir. Tied embeddings are stored once (as HF does)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: _own_storage(v.detach().cpu()) for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype = next(iter(state.values())).dtype
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, dtype), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is its storage, else a copy: safetensors refuses tensors that share memory,
    and the parts of a fused q/k/v or gate/up weight are views into one parameter."""
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
    return t if whole else t.clone()


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_state_for_saving(optimizer: torch.optim.Optimizer, mode: str) -> dict | None:
    """The optimizer's state dict as a checkpoint keeps it. AdamW holds two moments per trained
    parameter, so "full" (fp32) is twice the fp32 model on disk: 1.08 GB next to a 538 MB model for
    the 135M embedded model. "bf16" halves that (a resume continues from moments rounded to bf16:
    close, not bit-exact); "none" drops it (a resume restarts the moments at zero). The step
    counter, RNG and data position stay exact in every mode."""
    if mode not in ("full", "bf16", "none"):
        raise ValueError(f"optimizer_state must be 'full', 'bf16' or 'none', got {mode!r}")
    if mode == "none":
        return None
    sd = optimizer.state_dict()
    if mode == "bf16":
        sd["state"] = {i: {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k != "step" else v
                           for k, v in st.items()} for i, st in sd["state"].items()}
    return sd


def save_checkpoint(trainer: Any, out: str | Path, optimizer_state: str = "full") -> Path:
    """Model (HF layout) + trainer_state.pt into `out`; replaces an existing checkpoint there.
    optimizer_state: "full" | "bf16" | "none" (see optimizer_state_for_saving)."""
    out = Path(out)
    opt = optimizer_state_for_saving(trainer.optimizer, optimizer_state)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(trainer.model, tmp, trainer.tokenizer)
    torch.save({
        "step": trainer.step_count,
        "optimizer": opt,
        "optimizer_state": optimizer_state,
        "trainer_rng": trainer.rng.getstate(),
        "global_rng": _rng_state(),
        "data": trainer.data.state_dict(),
        "config": trainer.config_dict(),
    }, tmp / TRAINER_STATE)
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def load_model_weights(model: Decoder, path: str | Path) -> None:
    """Copy a saved model.safetensors into an existing Decoder's tensors (in place, so an engine
    built around this Decoder sees them)."""
    state = load_file(str(Path(path) / "model.safetensors"))
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if model.cfg.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name in state:
                p.copy_(state[name])


def resume(trainer: Any, path: str | Path, load_weights: bool = True) -> None:
    """Restore a trainer (built from the same config and data file) to the saved state."""
    path = Path(path)
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {TRAINER_STATE})")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    saved_cfg = {k: v for k, v in state["config"].items()}
    current = trainer.config_dict()
    differs = sorted(k for k in saved_cfg if k in current and _norm(saved_cfg[k]) != _norm(current[k]))
    if differs:
        raise ValueError(f"cannot resume {path}: training config differs in {', '.join(differs)}")
    if load_weights:
        load_model_weights(trainer.model, path)
    if state["optimizer"] is None:  # saved with optimizer_state="none": AdamW moments restart at zero
        warnings.warn(f"{path} holds no optimizer state: AdamW restarts its moments at zero (not an exact resume)",
                      stacklevel=2)
    else:  # bf16 moments are cast back to the parameters' dtype by load_state_dict
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.rng.setstate(state["trainer_rng"])
    _set_rng_state(state["global_rng"])
    trainer.data.load_state_dict(state["data"])
    trainer.step_count = state["step"]
    trainer.sampler.invalidate_prefix_cache()


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
