"""GRPO training of reward reasoning models on the same Decoder the engine serves.

trainer.py (the step) uses grpo.py (advantages, loss), rollout.py (prompts in random order,
rule-based reward) through engine_sampler.py (the engine around the trainer's own Decoder),
logprobs.py (dense training forward + chunked selective log-softmax), data.py (pairs),
checkpoint.py (HF model dir + trainer state); cli.py is `python -m rrm_engine train`.
"""
from .data import PairStream, PreferencePair
from .grpo import group_advantages, grpo_loss, k3_kl

__all__ = ["PairStream", "PreferencePair", "group_advantages", "grpo_loss", "k3_kl"]
