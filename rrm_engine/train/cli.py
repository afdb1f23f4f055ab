"""`python -m rrm_engine train ...`: GRPO on preference pairs, with a progress bar, a JSONL metrics
log (one line per step) and checkpoints (a Hugging Face model dir plus trainer state) under --out.

rrm_engine/cli.py calls add_parser(subparsers) when this package is present.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    t = subparsers.add_parser("train", help="GRPO training of a reward reasoning model on preference pairs")
    t.add_argument("--model", default="embedded", help='"embedded", an HF model dir or a .gguf (default: embedded)')
    t.add_argument("--data", type=Path, required=True, help="JSONL {prompt, chosen, rejected} or a PandaLM JSON file")
    t.add_argument("--data-format", choices=("auto", "jsonl", "pandalm"), default="auto")
    t.add_argument("--out", type=Path, required=True, help="output dir: metrics.jsonl and checkpoint/")
    t.add_argument("--steps", type=int, required=True, help="optimizer steps to reach (counting resumed ones)")
    t.add_argument("--group-size", type=int, default=8, help="rollouts per pair (G)")
    t.add_argument("--pairs-per-step", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-6)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--eps-low", type=float, default=0.2)
    t.add_argument("--eps-high", type=float, default=0.28)
    t.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL penalty to the initial model (0: none)")
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--top-p", type=float, default=1.0)
    t.add_argument("--max-tokens", type=int, default=1024, help="thinking + answer tokens per rollout")
    t.add_argument("--updates-per-batch", type=int, default=1)
    t.add_argument("--micro-batch-size", type=int, default=8)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--trainable", default="all",
                   help='"all" or "last_n:K": train only the last K decoder layers + final norm (default: all)')
    t.add_argument("--train-zero-advantage", action="store_true",
                   help="also run groups whose rewards all agree through the training pass (changes nothing "
                        "but cost; measures the engine/trainer log-prob mismatch on every rollout)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=0, help="save every N steps (0: only at the end)")
    t.add_argument("--resume", type=Path, default=None, help="a checkpoint dir written by this command")
    t.add_argument("--device", default=None, help="cuda when available, else cpu")
    t.add_argument("--kv-cache-tokens", type=int, default=None)
    m = t.add_argument_group("GPU memory (trainer first, rollouts get the rest; see rrm_engine/train/memory.py)")
    m.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the GPU the trainer and the rollout engine use together (default 0.9)")
    m.add_argument("--trainer-memory-gb", type=float, default=None,
                   help="reserve this much for gradients, AdamW and activations instead of the estimate")
    m.add_argument("--max-prompt-tokens", type=int, default=2048,
                   help="longest prompt the trainer's activation estimate assumes (default 2048)")
    m.add_argument("--rollout-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="engine dtype for rollouts (auto: bfloat16 on GPU, the parameters' fp32 on CPU)")
    t.set_defaults(func=run)
    return t


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..loader import load
    from .checkpoint import resume, save_checkpoint
    from .data import PairStream
    from .engine_sampler import EngineSampler
    from .trainer import GRPOTrainer, TrainConfig

    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    cfg = TrainConfig(pairs_per_step=args.pairs_per_step, group_size=args.group_size, lr=args.lr,
                      weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, eps_low=args.eps_low,
                      eps_high=args.eps_high, kl_coef=args.kl_coef, temperature=args.temperature, top_p=args.top_p,
                      max_tokens=args.max_tokens, updates_per_batch=args.updates_per_batch,
                      micro_batch_size=args.micro_batch_size, gradient_checkpointing=args.gradient_checkpointing,
                      skip_zero_advantage=not args.train_zero_advantage, trainable=args.trainable,
                      seed=args.seed)
    cfg.validate()
    torch.manual_seed(args.seed)
    data = PairStream(args.data, seed=args.seed, fmt=args.data_format)
    # fp32 parameters (AdamW state needs them); on GPU the training forward autocasts to bf16
    loaded = load(args.resume if args.resume else args.model, device=args.device, dtype=torch.float32)
    if loaded.tokenizer is None:
        raise SystemExit(f"{args.model}: the model has no tokenizer; the RRM prompt needs one")
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

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / CHECKPOINT_DIR
    with open(args.out / METRICS_FILE, "a") as log, tqdm(total=args.steps, initial=trainer.step_count, desc="grpo") as bar:
        while trainer.step_count < args.steps:
            m = trainer.step()
            log.write(json.dumps(m) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward_mean']:+.2f}", invalid=f"{m['invalid_rate']:.2f}", kl=f"{m['kl']:.3g}")
            if args.save_every and trainer.step_count % args.save_every == 0:
                save_checkpoint(trainer, ckpt)
    save_checkpoint(trainer, ckpt)
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

    from ..memory_plan import CudaMemoryProbe, GiB
    from .memory import TrainerMemory, estimate_trainer_memory, rollout_memory_utilization
    from .trainable import apply_trainable

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
