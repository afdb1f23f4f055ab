"""GPU memory for GRPO: the trainer's share is reserved first, rollouts get the rest.

The trainer and the rollout engine share one device. The engine's KV cache stays allocated
while the trainer runs its forward/backward and AdamW step, so the engine may only be given
what the trainer will not need: its gradients, AdamW's two moments (allocated lazily at the
first step, so they must be reserved before the engine sizes its cache), foreach temporaries,
and the activations of one micro-batch at the longest sequence. These are estimated here (or
the caller gives the trainer's budget outright) and the engine gets, in vLLM's terms,

    gpu_memory_utilization = (cap * total - memory in use now - trainer reserve) / total

where `cap` is the fraction of the device trainer and rollouts may use together and "in use
now" is the trained parameters (plus a KL reference model, the CUDA context, other processes).

The activation estimate counts what autograd saves per token and layer for this decoder (q/k/v,
rotary outputs, attention output, the MLP's gate/up/product, the norms' inputs and outputs, the
residual stream), plus backward's transient (one layer's gradients, one LM-head chunk);
tests/test_train_memory.py checks the saved part against the tensors autograd really saves on CPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..core.memory_plan import CudaMemoryProbe, GiB, InsufficientMemoryError, MemoryProbe, check_utilization
from ..model.decoder import Decoder


@dataclass(frozen=True)
class TrainerMemory:
    gradients: int
    optimizer: int  # AdamW exp_avg + exp_avg_sq, and the foreach step's temporaries
    saved_activations: int  # what autograd keeps for backward over one micro-batch
    transient: int  # on top during backward: one layer's activation gradients, one LM-head chunk
    given: int | None = None  # an explicit budget, which replaces the estimate

    @property
    def activations(self) -> int:
        return self.saved_activations + self.transient

    @property
    def total(self) -> int:
        return self.given if self.given is not None else self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict:
        return dict(asdict(self), total=self.total)


def estimate_trainer_memory(model: Decoder, *, micro_batch_size: int, seq_len: int, gradient_checkpointing: bool,
                            logprob_chunk_size: int, activation_bytes: int) -> TrainerMemory:
    """The trainer's memory beyond the parameters it already holds. activation_bytes: 2 under
    bf16 autocast (GPU), the parameter size otherwise. seq_len: prompt + response tokens of the
    longest rollout (micro-batches are right-padded to it)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in trained)
    cfg = model.cfg
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    q = cfg.num_heads * cfg.head_dim
    a = activation_bytes
    r = next(model.parameters()).element_size()  # the residual stream stays in the parameters' dtype
    # saved per token by one layer: each of the two RMSNorms keeps its input, the normalised input
    # and its output in the residual stream's dtype (3h each) and the linear after it a cast copy
    # (h each); the fused q/k/v output, rotated q and k, the attention output (3q + 3kv); the
    # fused gate/up output, silu(gate) and their product (4i)
    full_layer = a * (2 * h + 3 * q + 3 * kv + 4 * i) + r * 6 * h
    tokens = micro_batch_size * seq_len
    if gradient_checkpointing:  # each layer keeps its two inputs; one layer at a time is recomputed
        saved = tokens * (cfg.num_layers * (a + r) * h + full_layer)
    else:
        saved = tokens * cfg.num_layers * full_layer
    saved += tokens * 4 * r * h  # the embedding output and the final norm's input, normalised input and output
    # backward holds one layer's activation gradients at a time, and the LM head runs over one
    # chunk of scored rows at a time: fp32 logits, their softmax and their gradient
    transient = tokens * full_layer + 3 * min(logprob_chunk_size, tokens) * cfg.vocab_size * 4
    return TrainerMemory(gradients=param_bytes, optimizer=3 * param_bytes, saved_activations=saved,
                         transient=transient)


def rollout_memory_utilization(probe: MemoryProbe, trainer: TrainerMemory, cap: float) -> float:
    """The engine's gpu_memory_utilization once the trainer's memory (in use now, and reserved
    for later) is set aside from cap * total. Raises when nothing would be left for rollouts."""
    check_utilization(cap)
    total, in_use = probe.total(), probe.total() - probe.free()
    left = int(total * cap) - in_use - trainer.total
    # the engine needs at least its weights and a step's activations: refuse a budget under 1% of the device
    if left < total // 100:
        what = (f"an explicit trainer budget of {trainer.total / GiB:.2f} GiB" if trainer.given is not None else
                f"gradients {trainer.gradients / GiB:.2f} GiB + AdamW {trainer.optimizer / GiB:.2f} GiB + "
                f"activations {trainer.activations / GiB:.2f} GiB (estimated)")
        raise InsufficientMemoryError(
            f"GRPO: {in_use / GiB:.2f} GiB in use now + the trainer's {what} leave "
            f"{left / GiB:.2f} GiB of {cap:g} x {total / GiB:.2f} GiB for rollouts; need at least "
            f"{(in_use + trainer.total + total // 100) / total:.2f} of the device: lower --micro-batch-size, "
            f"use --gradient-checkpointing or --trainable last_n:K, or raise --gpu-memory-utilization")
    return left / total
