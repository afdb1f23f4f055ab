"""Token log-probs of responses under the training (dense, autograd) path of the Decoder.

Sequences are prompt + response, right-padded into [B, L]. The hidden state at position i predicts
token i + 1, so a response occupying [p, p + r) is scored from hidden rows [p - 1, p + r - 1).
Only those rows go through the LM head, via the chunked selective log-softmax, so the [tokens,
vocab] logits are never materialised for the prompt (nor, with the kernel, for the response).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rrm_kernels.selective_log_softmax import selective_log_softmax

from ..model.decoder import Decoder


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, L] right-padded
    positions: torch.Tensor  # [B, L]
    score_rows: torch.Tensor  # [B, L] bool: hidden rows that predict a response token
    labels: torch.Tensor  # [N] the response tokens, in the row-major order of score_rows
    response_mask: torch.Tensor  # [B, R] bool: valid entries of the [B, R] response layout

    @property
    def num_tokens(self) -> int:
        return int(self.labels.numel())


def pack(prompts: list[list[int]], responses: list[list[int]], device: torch.device | str, pad_id: int = 0) -> PackedBatch:
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need one response per prompt and at least one pair, got {len(prompts)} / {len(responses)}")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"sequence {i}: empty prompt (a response token needs a preceding position)")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    b, l, rmax = len(prompts), max(lengths), max(1, max(len(r) for r in responses))
    ids = torch.full((b, l), pad_id, dtype=torch.long)
    score = torch.zeros(b, l, dtype=torch.bool)
    resp_mask = torch.zeros(b, rmax, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        score[i, len(p) - 1:len(p) + len(r) - 1] = True
        resp_mask[i, :len(r)] = True
    labels = torch.cat([torch.tensor(r, dtype=torch.long) for r in responses])
    positions = torch.arange(l, dtype=torch.long).expand(b, l).contiguous()
    return PackedBatch(ids.to(device), positions.to(device), score.to(device), labels.to(device), resp_mask.to(device))


def response_logprobs(model: Decoder, batch: PackedBatch, temperature: float = 1.0,
                      chunk_size: int = 1024) -> torch.Tensor:
    """[B, R] log-probs of the response tokens under log_softmax(logits / temperature); 0 where
    response_mask is False. Differentiable when called with grad enabled."""
    hidden = model(batch.input_ids, batch.positions)  # [B, L, H]
    flat = selective_log_softmax(hidden[batch.score_rows], model.lm_head_weight, batch.labels,
                                 temperature=temperature, chunk_size=chunk_size)
    out = flat.new_zeros(batch.response_mask.shape)
    return out.masked_scatter(batch.response_mask, flat.float())
