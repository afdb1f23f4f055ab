"""The inference side of GRPO: the engine, built around the trainer's own Decoder object.

No copy and no weight transfer: the engine's model IS the trained module, so the parameter
tensors the optimizer updates in place are the ones the next rollout reads. The engine runs the
model without autograd; what it caches (prefix KV) was computed with old weights, so the trainer
invalidates that cache after every optimizer step.
"""
from __future__ import annotations

import random
from typing import Any

from ..llm import LLM
from ..sampling_params import SamplingParams
from .rollout import Completion


class EngineSampler:
    """Sampler over rrm_engine.LLM. Identical prompts of one call become one request with n
    samples, so the engine prefills the prompt once and forks it."""

    def __init__(self, llm: LLM, temperature: float, top_p: float, max_tokens: int):
        self.llm = llm
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens

    @classmethod
    def around(cls, loaded: Any, temperature: float, top_p: float, max_tokens: int, **llm_kwargs: Any) -> "EngineSampler":
        """loaded: a loader.LoadedModel whose .model is the Decoder being trained (used as is)."""
        return cls(LLM(model=loaded, **llm_kwargs), temperature, top_p, max_tokens)

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
        self.llm.invalidate_prefix_cache()
