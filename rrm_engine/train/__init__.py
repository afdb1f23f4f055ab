"""GRPO training of reward reasoning models on the same Decoder the engine serves.

grpo.py (advantages, loss) <- trainer.py (the step) -> rollout.py (prompts, rewards) -> engine;
data.py (pairs), logprobs.py (training forward), checkpoint.py (HF dir + trainer state), cli.py.
"""
from .data import PairStream, PreferencePair
from .grpo import group_advantages, grpo_loss, k3_kl

__all__ = ["PairStream", "PreferencePair", "group_advantages", "grpo_loss", "k3_kl"]
