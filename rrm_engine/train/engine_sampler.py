"""The inference side of GRPO: the engine, built around the trainer's own Decoder object.

When rollouts run in the parameters' dtype (the CPU default) there is no copy and no weight
transfer: the engine's model IS the trained module, so the parameter tensors the optimizer updates
in place are the ones the next rollout reads. When they run in another dtype (bf16 rollouts of an
fp32 policy, the GPU default of `python -m rrm_engine train`), the engine holds its own copy in
that dtype, and the trained parameters are copied into it, in place, after every optimizer step.
Either way the engine runs without autograd; what it caches (prefix KV) was computed with old
weights, so the trainer invalidates that cache after every optimizer step.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch

from ..llm import LLM
from ..model.decoder import Decoder
from ..sampling_params import SamplingParams
from .rollout import Completion


class EngineSampler:
    """Sampler over rrm_engine.LLM. Identical prompts of one call become one request with n
    samples, so the engine prefills the prompt once and forks it."""

    def __init__(self, llm: LLM, temperature: float, top_p: float, max_tokens: int, policy: Decoder | None = None):
        """policy: the trained Decoder when the engine serves a copy of it (copied in by
        invalidate_prefix_cache); None when the engine's model is the policy itself."""
        self.llm = llm
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.policy = policy

    @classmethod
    def around(cls, loaded: Any, temperature: float, top_p: float, max_tokens: int,
               rollout_dtype: torch.dtype | None = None, **llm_kwargs: Any) -> "EngineSampler":
        """loaded: a loader.LoadedModel whose .model is the Decoder being trained. It is used as is
        when rollout_dtype is None or its own dtype; otherwise the engine gets a copy in rollout_dtype."""
        policy = loaded.model
        if rollout_dtype is None or rollout_dtype == policy.lm_head_weight.dtype:
            return cls(LLM(model=loaded, **llm_kwargs), temperature, top_p, max_tokens)
        served = dataclasses.replace(loaded, model=rollout_copy(policy, rollout_dtype))
        return cls(LLM(model=served, **llm_kwargs), temperature, top_p, max_tokens, policy=policy)

    def sample(self, prompts: list[list[int]], seed: int) -> list[Completion]:
        where: dict[tuple[int, ...], list[int]] = {}  # prompt -> positions in `prompts`
        for i, p in enumerate(prompts):
            where.setdefault(tuple(p), []).append(i)
        # one independent base seed per request: the engine derives sample seeds from
        # (base seed, sample index), so equal base seeds would draw equal tokens
        rng = random.Random(seed)
        params = [SamplingParams(n=len(pos), temperature=self.temperature, top_p=self.top_p,
                                 max_tokens=self.max_tokens, seed=rng.getrandbits(63))
                  for pos in where.values()]
        outs = self.llm.generate([list(p) for p in where], params)
        result: list[Completion | None] = [None] * len(prompts)
        for positions, req in zip(where.values(), outs):
            for i, o in zip(positions, req.outputs):
                result[i] = self._completion(o)
        return result  # type: ignore[return-value]

    def _completion(self, o: Any) -> Completion:
        # sampling_logprobs: log_softmax(logits / T) of each sampled token, what the trainer recomputes
        if len(o.sampling_logprobs) != len(o.token_ids):
            raise RuntimeError("the engine returned no per-token sampling log-probs; GRPO needs them")
        return Completion(list(o.token_ids), list(o.sampling_logprobs), float(o.cumulative_logprob), o.text,
                          o.finish_reason)

    def invalidate_prefix_cache(self) -> None:
        """After an optimizer step: refresh the engine's copy of the weights (if it has one) and
        forget the KV computed with the old ones."""
        if self.policy is not None:
            sync_weights(self.policy, self.llm.engine.model)
        self.llm.invalidate_prefix_cache()


def rollout_copy(policy: Decoder, dtype: torch.dtype) -> Decoder:
    """A frozen copy of `policy` in `dtype` on the same device, built without a second copy in
    the policy's own dtype (the parameters are cast one at a time into a decoder built on meta)."""
    with torch.device("meta"):
        served = Decoder(policy.cfg)
    state = {name: t.detach().to(dtype) for name, t in policy.state_dict().items()}
    served.load_state_dict(state, assign=True)
    served.requires_grad_(False)
    return served.eval()


@torch.no_grad()
def sync_weights(policy: Decoder, served: Decoder) -> None:
    """Copy the trained parameters into the engine's copy, in place (captured CUDA graphs keep
    reading the same storage). Frozen parameters never change, so they are skipped."""
    served_params = dict(served.named_parameters())
    for name, p in policy.named_parameters():
        if p.requires_grad:
            served_params[name].copy_(p)
