"""A tiny Qwen2 checkpoint whose weights script what it generates, so that tests can make the real
engine produce a chosen text (a verdict, "\\boxed{both}", a missing box, ...) without mocking anything.

How: every layer's o_proj and down_proj are zero, so the final hidden state is the embedding of the
current token (the model is a bigram table). The tokens that have a successor get orthogonal
embeddings of norm sqrt(hidden) (RMS 1, so the final RMSNorm leaves them as they are), and the head
row of each successor u holds weight * (unit embedding of t): the logit of u after t is
weight * sqrt(hidden), every other listed logit is 0. With the default weight 10 that is a margin of 80
nats: greedy and temperature-0.6 sampling both follow the script.

A script is a chain of token ids, each followed by the next; the first id is the last prompt token
(the chat template's generation prompt ends with it) and the chain ends with EOS. Each token may have
only one successor (a token repeated in the chain would loop), and at most `hidden` distinct tokens
may have successors. `soft` maps a token to several successors with their own weights (a forced
verdict read from "1" vs "2" then has P("1") = sigmoid(sqrt(hidden) * (w1 - w2))).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

HIDDEN = 64


def write_scripted_qwen2(path: Path, tokenizer, chains: Sequence[Sequence[int]],
                         soft: dict[int, dict[int, float]] | None = None, weight: float = 10.0) -> Path:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    table: dict[int, dict[int, float]] = {}
    for chain in chains:
        for t, u in zip(chain, chain[1:]):
            if t in table and table[t] != {u: weight}:
                raise ValueError(f"token {t} ({tokenizer.decode([t])!r}) would need two successors")
            table[t] = {u: weight}
    for t, succ in (soft or {}).items():
        if t in table:
            raise ValueError(f"token {t} ({tokenizer.decode([t])!r}) is already scripted")
        table[t] = dict(succ)
    if len(table) > HIDDEN:
        raise ValueError(f"{len(table)} scripted tokens; at most {HIDDEN} fit")
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False, use_sliding_window=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    basis = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, dtype=torch.float64))[0].float()  # orthonormal rows
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for k, (t, succ) in enumerate(sorted(table.items())):
            emb[t] = basis[k] * HIDDEN ** 0.5
            for u, w in succ.items():
                head[u] += w * basis[k]
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def script_ids(tokenizer, prompt_ids: Sequence[int], text: str, eos: int = 2) -> list[int]:
    """The chain that makes the model answer `text` (then EOS) after a prompt ending in prompt_ids[-1]."""
    return [prompt_ids[-1], *tokenizer(text, add_special_tokens=False)["input_ids"], eos]
