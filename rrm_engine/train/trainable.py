"""Which parameters GRPO trains: all of them, or only the top of the network.

"last_n:K" trains the last K decoder layers and the final norm (and an untied LM head) and freezes
the rest with requires_grad=False, so autograd records nothing below layer L-K: the backward pass,
the gradients and the AdamW state cover only the trained part. That makes a CPU learning check on
a real model affordable. A tied LM head is the input embedding: training it would carry the
gradient back through every layer to the embedding lookup, so under last_n it stays frozen.
"""
from __future__ import annotations

from ..model.decoder import Decoder


def parse_trainable(spec: str) -> int | None:
    """"all" -> None; "last_n:K" -> K (>= 1). Anything else raises, naming the accepted forms."""
    if spec == "all":
        return None
    kind, _, count = spec.partition(":")
    if kind == "last_n" and count.isdigit() and int(count) >= 1:
        return int(count)
    raise ValueError(f"trainable must be 'all' or 'last_n:K' with K >= 1, got {spec!r}")


def apply_trainable(model: Decoder, spec: str) -> None:
    """Set requires_grad on the model's parameters for `spec`. "all" leaves the flags untouched
    (every parameter the caller has not frozen is trained)."""
    k = parse_trainable(spec)
    if k is None:
        return
    layers = model.model.layers
    if k > len(layers):
        raise ValueError(f"trainable={spec!r}: the model has only {len(layers)} decoder layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - k:]:
        layer.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    if not model.cfg.tie_word_embeddings:
        model.lm_head.requires_grad_(True)
