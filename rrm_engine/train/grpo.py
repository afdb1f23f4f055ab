"""GRPO objective: group-normalised advantages and the clipped, token-mean policy loss.

One prompt (a preference pair) gets G rollouts; each rollout's reward is compared only with its
own group, so no value network is needed. Every response token of a rollout carries that
rollout's advantage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards [P, G] (P groups of G rollouts) -> advantages [P, G] = (r - mean) / (std + eps).

    std is the population standard deviation of the group (divide by G, not G - 1): with the
    +1/-1 reward a group split k : G-k gets advantages of a fixed scale (+-1 for an even split,
    whatever G is), and G = 2 stays well defined. A group whose rewards are all equal has std 0
    and gets advantage 0 (no signal), eps only keeps that division finite.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, group_size], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from samples of the policy (Schulman's k3):
    exp(ref - logp) - (ref - logp) - 1; non-negative and unbiased."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class LossStats:
    """Token-weighted sums, so micro-batches add up; divide by `tokens` for means."""
    tokens: float
    clipped_tokens: float  # tokens whose gradient the clip removed
    kl_sum: float
    ratio_max: float


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              eps_low: float, eps_high: float, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
              normalizer: float | None = None) -> tuple[torch.Tensor, LossStats]:
    """Clipped-ratio policy loss, mean over all response tokens of the batch.

    logp, old_logp, ref_logp, mask: [B, T] (mask 1 on response tokens); advantages: [B].
    The ratio exp(logp - old_logp) is clipped to [1 - eps_low, 1 + eps_high] (separate bounds:
    a larger eps_high lets unlikely tokens with positive advantage grow, DAPO's clip-higher).
    normalizer: the token count to divide by; pass the whole batch's count when the batch is
    split into micro-batches so that their losses sum to the token mean of the whole batch.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)  # pessimistic bound, as in PPO
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if kl_coef != 0.0:
        per_token = per_token + kl_coef * kl
    n_tokens = mask.sum()
    denom = normalizer if normalizer is not None else n_tokens.clamp(min=1.0)
    loss = (per_token * mask).sum() / denom
    with torch.no_grad():
        was_clipped = (clipped > unclipped) & (mask > 0)
        stats = LossStats(
            tokens=float(n_tokens),
            clipped_tokens=float(was_clipped.sum()),
            kl_sum=float((kl * mask).sum()),
            ratio_max=float((ratio * mask).max()) if n_tokens > 0 else 1.0,
        )
    return loss, stats
