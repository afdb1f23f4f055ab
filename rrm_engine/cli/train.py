"""`rrm-engine train ...`: GRPO on preference pairs, with a progress bar, a JSONL metrics
log (one line per step) and checkpoints (a Hugging Face model dir plus trainer state) under --out.

rrm_engine/cli/main.py calls add_parser(subparsers) when this package is present (cli.PLUGINS). Every
argument, the data file (each record) and --out are checked before the model loads; a run that
fails before its first step leaves no run directory behind.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
OPTIMIZER_STATES = ("full", "bf16", "none")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from .main import device_arg, existing_file, model_arg, nonneg_float, positive_float, positive_int, unit_interval

    t = subparsers.add_parser("train", help="GRPO training of a reward reasoning model on preference pairs",
                              description="GRPO training of a reward reasoning model on preference pairs")
    t.add_argument("--model", default="embedded", type=model_arg,
                   help='"embedded", an HF model dir or a .gguf (default: embedded)')
    t.add_argument("--data", type=existing_file, required=True,
                   help="JSONL {prompt, chosen, rejected} or a PandaLM JSON file")
    t.add_argument("--data-format", choices=("auto", "jsonl", "pandalm"), default="auto")
    t.add_argument("--out", type=Path, required=True, help="output dir: metrics.jsonl and checkpoint/")
    t.add_argument("--steps", type=positive_int, required=True, help="optimizer steps to reach (counting resumed ones)")
    t.add_argument("--group-size", type=_group_size, default=8, help="rollouts per pair (G >= 2)")
    t.add_argument("--pairs-per-step", type=positive_int, default=4)
    t.add_argument("--lr", type=positive_float, default=1e-6)
    t.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    t.add_argument("--max-grad-norm", type=positive_float, default=1.0)
    t.add_argument("--eps-low", type=nonneg_float, default=0.2)
    t.add_argument("--eps-high", type=nonneg_float, default=0.28)
    t.add_argument("--kl-coef", type=nonneg_float, default=0.0, help="k3 KL penalty to the initial model (0: none)")
    t.add_argument("--temperature", type=positive_float, default=1.0)
    t.add_argument("--top-p", type=unit_interval, default=1.0)
    t.add_argument("--max-tokens", type=positive_int, default=1024, help="thinking + answer tokens per rollout")
    t.add_argument("--updates-per-batch", type=positive_int, default=1)
    t.add_argument("--micro-batch-size", type=positive_int, default=8)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--trainable", default="all", type=_trainable,
                   help='"all" or "last_n:K": train only the last K decoder layers + final norm (default: all)')
    t.add_argument("--train-zero-advantage", action="store_true",
                   help="also run groups whose rewards all agree through the training pass (changes nothing "
                        "but cost; measures the engine/trainer log-prob mismatch on every rollout)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=_nonneg_int, default=0, help="save every N steps (0: only at the end)")
    t.add_argument("--optimizer-state", choices=OPTIMIZER_STATES, default="full",
                   help="AdamW moments in the checkpoint: full (fp32, exact resume; 2x the fp32 model), bf16 "
                        "(half that; resume continues from rounded moments) or none (resume restarts them at 0)")
    t.add_argument("--resume", type=_checkpoint_dir, default=None, help="a checkpoint dir written by this command")
    t.add_argument("--device", default=None, type=device_arg, help="cuda when available, else cpu")
    t.add_argument("--kv-cache-tokens", type=positive_int, default=None)
    m = t.add_argument_group("GPU memory (trainer first, rollouts get the rest; see rrm_engine/train/memory.py)")
    m.add_argument("--gpu-memory-utilization", type=unit_interval, default=0.9,
                   help="fraction of the GPU the trainer and the rollout engine use together (default 0.9)")
    m.add_argument("--trainer-memory-gb", type=positive_float, default=None,
                   help="reserve this much for gradients, AdamW and activations instead of the estimate")
    m.add_argument("--max-prompt-tokens", type=positive_int, default=2048,
                   help="longest prompt the trainer's activation estimate assumes (default 2048)")
    m.add_argument("--rollout-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="engine dtype for rollouts (auto: bfloat16 on GPU, the parameters' fp32 on CPU)")
    t.set_defaults(func=run)
    return t


def _group_size(text: str) -> int:
    from .main import number_arg
    return number_arg(text, int, lambda v: v >= 2, "an integer >= 2 (GRPO compares the rollouts of a group)")


def _trainable(text: str) -> str:
    from .main import accepted_by
    from ..train.trainable import parse_trainable
    return accepted_by(parse_trainable, text)


def _nonneg_int(text: str) -> int:
    from .main import number_arg
    return number_arg(text, int, lambda v: v >= 0, "an integer >= 0")


def _checkpoint_dir(text: str) -> Path:
    from ..train.checkpoint import TRAINER_STATE
    path = Path(text).expanduser()
    if not (path / TRAINER_STATE).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a checkpoint written by `train` (no {TRAINER_STATE} in it)")
    return path


def _check_out(out: Path, resume: Path | None) -> None:
    """--out must be creatable and writable, and must not hold a checkpoint this run would replace."""
    import os
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    existing = out / CHECKPOINT_DIR
    if existing.exists() and resume is None:
        raise ValueError(f"--out {out} already holds a checkpoint; continue it with --resume {existing}, "
                         "or choose another --out")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write --out {out}: {parent} is not writable")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..model.loader import load
    from ..train.checkpoint import resume, save_checkpoint
    from ..train.data import PairStream
    from ..train.engine_sampler import EngineSampler
    from ..train.trainer import GRPOTrainer, TrainConfig

    # everything the user can get wrong is checked before the model loads
    cfg = TrainConfig(pairs_per_step=args.pairs_per_step, group_size=args.group_size, lr=args.lr,
                      weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, eps_low=args.eps_low,
                      eps_high=args.eps_high, kl_coef=args.kl_coef, temperature=args.temperature, top_p=args.top_p,
                      max_tokens=args.max_tokens, updates_per_batch=args.updates_per_batch,
                      micro_batch_size=args.micro_batch_size, gradient_checkpointing=args.gradient_checkpointing,
                      skip_zero_advantage=not args.train_zero_advantage, trainable=args.trainable,
                      seed=args.seed)
    cfg.validate()
    data = PairStream(args.data, seed=args.seed, fmt=args.data_format)
    data.check()
    _check_out(args.out, args.resume)

    torch.manual_seed(args.seed)
    # fp32 parameters (AdamW state needs them); on GPU the training forward autocasts to bf16
    print(f"loading {args.resume or args.model} ...", file=sys.stderr, flush=True)
    loaded = load(args.resume if args.resume else args.model, device=args.device, dtype=torch.float32)
    if loaded.tokenizer is None:
        raise ValueError(f"{args.model}: the model has no tokenizer; the RRM prompt needs one")
    ref = None
    if cfg.kl_coef != 0.0:  # the reference is the initial model, also when resuming
        ref = load(args.model, device=args.device, dtype=torch.float32).model if args.resume else copy.deepcopy(loaded.model)
    llm_kwargs = {"kv_cache_tokens": args.kv_cache_tokens} if args.kv_cache_tokens else {}
    llm_kwargs.update(_rollout_memory(args, loaded.model, cfg))
    sampler = EngineSampler.around(loaded, cfg.temperature, cfg.top_p, cfg.max_tokens,
                                   rollout_dtype=_rollout_dtype(args.rollout_dtype, loaded.model), **llm_kwargs)
    trainer = GRPOTrainer(loaded.model, loaded.tokenizer, data, sampler, cfg, ref_model=ref)
    if args.resume:
        resume(trainer, args.resume, load_weights=False)

    created = not args.out.exists()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / CHECKPOINT_DIR
    start = trainer.step_count
    try:
        with open(args.out / METRICS_FILE, "a") as log, \
                tqdm(total=args.steps, initial=trainer.step_count, desc="grpo", unit="step") as bar:
            while trainer.step_count < args.steps:
                m = trainer.step()
                log.write(json.dumps(m) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward_mean']:+.2f}", invalid=f"{m['invalid_rate']:.2f}",
                                kl=f"{m['kl']:.3g}")
                if args.save_every and trainer.step_count % args.save_every == 0:
                    save_checkpoint(trainer, ckpt, optimizer_state=args.optimizer_state)
    except BaseException:
        if created and trainer.step_count == start:  # nothing done: leave no empty run dir behind
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    save_checkpoint(trainer, ckpt, optimizer_state=args.optimizer_state)
    print(f"saved {ckpt} (step {trainer.step_count}); metrics in {args.out / METRICS_FILE}")
    return 0


def _rollout_dtype(choice: str, model: Any):
    import torch
    if choice == "auto":
        return torch.bfloat16 if model.lm_head_weight.device.type == "cuda" else None
    return getattr(torch, choice)


def _rollout_memory(args: argparse.Namespace, model: Any, cfg: Any, probe: Any = None) -> dict:
    """On a GPU (or with a memory probe): reserve the trainer's memory first and return the rollout
    engine's gpu_memory_utilization (printed with the reserve); nothing to do on CPU."""
    import sys

    from ..train.memory import (CudaMemoryProbe, GiB, TrainerMemory, estimate_trainer_memory,
                                rollout_memory_utilization)
    from ..train.trainable import apply_trainable

    device = model.lm_head_weight.device
    if probe is None and device.type != "cuda":
        return {}
    apply_trainable(model, cfg.trainable)  # the reserve covers the trained parameters only
    if args.trainer_memory_gb is not None:
        trainer = TrainerMemory(0, 0, 0, 0, given=int(args.trainer_memory_gb * GiB))
    else:
        trainer = estimate_trainer_memory(model, micro_batch_size=cfg.micro_batch_size,
                                          seq_len=args.max_prompt_tokens + cfg.max_tokens,
                                          gradient_checkpointing=cfg.gradient_checkpointing,
                                          logprob_chunk_size=cfg.logprob_chunk_size, activation_bytes=2)
    util = rollout_memory_utilization(probe or CudaMemoryProbe(device), trainer, args.gpu_memory_utilization)
    print(f"trainer reserve: {trainer.total / GiB:.2f} GiB {trainer.as_dict()}; rollout engine "
          f"gpu_memory_utilization={util:.3f}", file=sys.stderr)
    return {"gpu_memory_utilization": util}
