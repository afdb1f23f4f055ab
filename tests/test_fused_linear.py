"""Fused q/k/v and gate/up projections: one GEMM each in the decoder, the separate Hugging Face
tensors in every checkpoint (state_dict names, load, save, gradients)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rrm_engine.model.config import ModelConfig
from rrm_engine.layers.fused_linear import FusedLinear
from rrm_engine.model.decoder import Decoder


def _decoder(hf) -> Decoder:
    d = hf.config.to_dict() | {"architectures": ["Qwen2ForCausalLM"]}
    return Decoder(ModelConfig.from_hf(d))


def test_state_dict_has_exactly_the_hf_names_and_values(hf_tiny_model):
    dec = _decoder(hf_tiny_model)
    dec.load_state_dict(hf_tiny_model.state_dict())
    ours, theirs = dec.state_dict(), hf_tiny_model.state_dict()
    if dec.cfg.tie_word_embeddings:
        theirs = {k: v for k, v in theirs.items() if k != "lm_head.weight"}
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name
    # and the model really holds them fused: one weight for q/k/v, one for gate/up
    names = {n for n, _ in dec.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(n.endswith((".q_proj.weight", ".gate_proj.weight", ".up_proj.weight")) for n in names)


def test_state_dict_parts_are_views_into_the_fused_weight(hf_tiny_model):
    dec = _decoder(hf_tiny_model)
    dec.load_state_dict(hf_tiny_model.state_dict())
    fused = dec.model.layers[1].self_attn.qkv_proj
    before = fused.weight.detach().clone()
    with torch.no_grad():
        dec.state_dict()["model.layers.1.self_attn.k_proj.weight"].fill_(3.0)
    q, k, v = fused.part_sizes
    assert torch.equal(fused.weight[q:q + k], torch.full_like(fused.weight[q:q + k], 3.0))
    assert torch.equal(fused.weight[:q], before[:q]) and torch.equal(fused.weight[q + k:], before[q + k:])


def test_missing_part_is_an_error_naming_it(hf_tiny_model):
    dec = _decoder(hf_tiny_model)
    state = dict(hf_tiny_model.state_dict())
    state.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(RuntimeError, match="gate_up_proj.weight"):
        dec.load_state_dict(state)


def test_fused_forward_and_gradients_match_separate_linears():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 24, generator=g, requires_grad=True)
    ws = [torch.randn(n, 24, generator=g) for n in (16, 8, 8)]
    bs = [torch.randn(n, generator=g) for n in (16, 8, 8)]
    lin = FusedLinear(24, (("q_proj", 16), ("k_proj", 8), ("v_proj", 8)), bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.cat(ws))
        lin.bias.copy_(torch.cat(bs))
    outs = lin.split(lin(x))
    refs = [F.linear(x, w, b) for w, b in zip(ws, bs)]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-5)
    # gradients of a loss that weighs the parts differently land in the right rows
    loss = sum((i + 1) * o.square().sum() for i, o in enumerate(outs))
    loss.backward()
    grad_x = x.grad.clone()
    x.grad = None
    wr = [w.clone().requires_grad_() for w in ws]
    ref_loss = sum((i + 1) * F.linear(x, w, b).square().sum() for i, (w, b) in enumerate(zip(wr, bs)))
    ref_loss.backward()
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lin.weight.grad, torch.cat([w.grad for w in wr]), rtol=1e-5, atol=1e-4)
