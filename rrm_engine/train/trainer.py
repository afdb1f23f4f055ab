"""The GRPO step: rollouts from the engine, rewards, group advantages, clipped token-mean loss,
AdamW, and the engine's cache invalidated so the next rollout sees the new weights.

The policy is one Decoder shared with the engine (see engine_sampler.py). The training forward is
its dense path (causal SDPA, autograd, optional gradient checkpointing); on GPU it runs under
bf16 autocast while the parameters and AdamW state stay in their own (fp32) dtype.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ..model.decoder import Decoder
from ..layers.weight_formats import is_serving_only, served_format
from .data import PairStream
from .grpo import LossStats, group_advantages, grpo_loss
from .logprobs import pack, response_logprobs
from .rollout import Rollout, RolloutCollector, RolloutConfig, Sampler, VerdictFn, rrm_verdict
from .trainable import apply_trainable, parse_trainable


@dataclass(frozen=True)
class TrainConfig(RolloutConfig):
    """The rollout settings (RolloutConfig's fields: group_size, temperature, top_p, max_tokens,
    prompt_suffix, system, user_template) plus the optimisation's."""
    pairs_per_step: int = 4  # groups per step; rollouts per step = pairs_per_step * group_size
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.0  # > 0 needs a frozen reference model
    adv_eps: float = 1e-6
    updates_per_batch: int = 1  # optimizer steps on one batch of rollouts (> 1: the ratio moves off 1)
    micro_batch_size: int = 8  # sequences per forward/backward
    logprob_chunk_size: int = 1024
    gradient_checkpointing: bool = False
    # rollouts with advantage 0 (groups whose rewards all agree) add exactly nothing to the loss
    # or its gradient when kl_coef == 0: leave them out of the training forward/backward
    skip_zero_advantage: bool = True
    # "all", or "last_n:K": train only the last K decoder layers + final norm (see trainable.py)
    trainable: str = "all"
    seed: int = 0

    def rollout_config(self) -> RolloutConfig:
        return RolloutConfig(**{f.name: getattr(self, f.name) for f in fields(RolloutConfig)})

    def validate(self) -> None:
        if self.pairs_per_step < 1 or self.micro_batch_size < 1 or self.updates_per_batch < 1:
            raise ValueError("pairs_per_step, micro_batch_size and updates_per_batch must be >= 1")
        if not (0 <= self.eps_low < 1) or self.eps_high < 0:
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.temperature <= 0:
            raise ValueError("GRPO samples rollouts: temperature must be > 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        parse_trainable(self.trainable)


class GRPOTrainer:
    def __init__(self, model: Decoder, tokenizer: Any, data: PairStream, sampler: Sampler, cfg: TrainConfig,
                 ref_model: Decoder | None = None, verdict_fn: VerdictFn = rrm_verdict):
        cfg.validate()
        if is_serving_only(model):  # an LLM(weights=...) converted its linears: no parameters left to train
            raise ValueError(f"the model serves {served_format(model)} weights (LLM(weights=...) converted them); "
                             "training needs the fp32/bf16 parameters: load the model again without weights=")
        if cfg.kl_coef != 0.0 and ref_model is None:
            raise ValueError("kl_coef != 0 needs a frozen reference model (ref_model=)")
        if ref_model is model:
            raise ValueError("ref_model must be a separate, frozen copy of the initial policy")
        self.model, self.tokenizer, self.data, self.sampler, self.cfg = model, tokenizer, data, sampler, cfg
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
        self.collector = RolloutCollector(tokenizer, cfg.rollout_config(), verdict_fn)
        apply_trainable(model, cfg.trainable)  # before the optimizer: it holds only trained parameters
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.rng = random.Random(cfg.seed)  # presentation orders and sampling seeds
        self.step_count = 0
        self.device = model.lm_head_weight.device
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else 0

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _logprobs(self, model: Decoder, rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, R] response log-probs, [B, R] bool mask of real response tokens)."""
        batch = pack([r.prompt_ids for r in rollouts], [r.completion.token_ids for r in rollouts], self.device, self.pad_id)
        with self._autocast():
            return response_logprobs(model, batch, self.cfg.temperature, self.cfg.logprob_chunk_size), batch.response_mask

    @staticmethod
    def _mismatch(chunk: list[Rollout], logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        """(max, sum) of |engine log-prob - trainer log-prob| over the response tokens."""
        engine = torch.zeros_like(logp)
        for j, r in enumerate(chunk):
            engine[j, :len(r.completion.logprobs)] = torch.tensor(r.completion.logprobs)
        diff = (engine - logp).abs()[mask]
        return (float(diff.max()), float(diff.sum())) if diff.numel() else (0.0, 0.0)

    def _micro_batches(self, n: int) -> list[slice]:
        mb = self.cfg.micro_batch_size
        return [slice(s, min(s + mb, n)) for s in range(0, n, mb)]

    def step(self) -> dict[str, float]:
        """One GRPO step (rollouts + `updates_per_batch` optimizer steps); returns its metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        pairs = self.data.take(cfg.pairs_per_step)
        rollouts = self.collector.collect(self.sampler, pairs, self.rng)
        t_rollout = time.perf_counter() - t0

        rewards = torch.tensor([r.reward for r in rollouts]).view(cfg.pairs_per_step, cfg.group_size)
        adv = group_advantages(rewards, cfg.adv_eps).flatten().to(self.device)
        lengths = [len(r.completion.token_ids) for r in rollouts]
        total_tokens = sum(lengths)  # the token mean is over ALL response tokens, trained or not
        keep = list(range(len(rollouts)))
        if cfg.skip_zero_advantage and cfg.kl_coef == 0.0:
            keep = [i for i in keep if adv[i].item() != 0.0]
        trained, adv = [rollouts[i] for i in keep], adv[keep]
        parts = self._micro_batches(len(trained))

        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.model.train()
        # old log-probs (the ratio's denominator) come from the trainer, not the engine, so a
        # sampler/trainer numeric mismatch cannot bias the update; they are computed once per
        # batch only when several updates reuse it (with one update they equal logp.detach()).
        old: list[torch.Tensor | None] = [None] * len(parts)
        ref: list[torch.Tensor | None] = [None] * len(parts)
        with torch.no_grad():
            for i, sl in enumerate(parts):
                if cfg.updates_per_batch > 1:
                    old[i] = self._logprobs(self.model, trained[sl])[0]
                if self.ref_model is not None and cfg.kl_coef != 0.0:
                    ref[i] = self._logprobs(self.ref_model, trained[sl])[0]

        mismatch_max, mismatch_sum = 0.0, 0.0
        grad_norm = 0.0
        for update in range(cfg.updates_per_batch):
            stats = LossStats(0.0, 0.0, 0.0, 0.0)
            loss_total = 0.0
            for i, sl in enumerate(parts):
                chunk = trained[sl]
                logp, mask = self._logprobs(self.model, chunk)
                if update == 0:
                    mm = self._mismatch(chunk, logp.detach(), mask)
                    mismatch_max, mismatch_sum = max(mismatch_max, mm[0]), mismatch_sum + mm[1]
                old_logp = old[i] if old[i] is not None else logp.detach()
                loss, s = grpo_loss(logp, old_logp, adv[sl], mask, cfg.eps_low, cfg.eps_high,
                                    ref_logp=ref[i], kl_coef=cfg.kl_coef, normalizer=float(total_tokens))
                loss.backward()
                loss_total += loss.item()
                stats = LossStats(stats.tokens + s.tokens, stats.clipped_tokens + s.clipped_tokens,
                                  stats.kl_sum + s.kl_sum, max(stats.ratio_max, s.ratio_max))
            for p in self.model.parameters():
                if p.requires_grad and p.grad is None:
                    # untouched (e.g. nothing trained this step): a zero gradient, so AdamW's
                    # momentum and weight decay advance exactly as if the zeros were computed
                    p.grad = torch.zeros_like(p)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        # the engine's cached prefix KV was computed with the weights that just changed
        self.sampler.invalidate_prefix_cache()
        self.step_count += 1

        dt = time.perf_counter() - t0
        n = len(rollouts)
        return {
            "step": self.step_count,
            "loss": loss_total,
            "reward_mean": float(rewards.mean()),
            "accuracy": sum(r.correct for r in rollouts) / n,
            "invalid_rate": sum(r.verdict is None for r in rollouts) / n,
            "kl": stats.kl_sum / max(total_tokens, 1),
            "clip_fraction": stats.clipped_tokens / max(total_tokens, 1),
            "ratio_max": stats.ratio_max if trained else None,
            # Monte-Carlo entropy estimate: mean -log p of the sampled tokens (free; the exact
            # entropy would need the full [tokens, vocab] softmax the chunked path avoids)
            "entropy": -sum(r.completion.sum_logprob for r in rollouts) / max(total_tokens, 1),
            "response_len_mean": total_tokens / n,
            "grad_norm": grad_norm,
            "trained_rollouts": len(trained),
            # measured on the trained rollouts; None when none was trained this step
            "logprob_mismatch_max": mismatch_max if trained else None,
            "logprob_mismatch_mean": mismatch_sum / max(sum(len(r.completion.token_ids) for r in trained), 1) if trained else None,
            "rollout_tokens_per_s": total_tokens / max(t_rollout, 1e-9),
            # whole step (rollout + training), prompt and response tokens
            "tokens_per_s": (sum(len(r.prompt_ids) for r in rollouts) + total_tokens) / max(dt, 1e-9),
            "step_time_s": dt,
        }

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.cfg)
