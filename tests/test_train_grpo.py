"""GRPO advantages and loss against numbers worked by hand (in the comments)."""
import math

import pytest
import torch

from rrm_engine.train.grpo import group_advantages, grpo_loss, k3_kl


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, -1.0, -1.0, -1.0],   # mean -0.5; population var (1.5^2 + 3 * 0.5^2) / 4 = 0.75
                            [1.0, 1.0, 1.0, 1.0],      # all equal: std 0 -> advantage 0
                            [1.0, -1.0, 1.0, -1.0]])   # even split: +-1
    adv = group_advantages(rewards, eps=1e-6)
    s = math.sqrt(0.75)
    want = torch.tensor([[1.5 / s, -0.5 / s, -0.5 / s, -0.5 / s],
                         [0.0, 0.0, 0.0, 0.0],
                         [1.0, -1.0, 1.0, -1.0]])
    torch.testing.assert_close(adv, want, rtol=0, atol=1e-5)


def test_group_advantages_rejects_flat_rewards():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(4))


def _batch():
    # row 0: A = +1, ratios 1.5, 0.9, 1.0 (all response tokens)
    # row 1: A = -2, ratios 0.5, 1.2, <padding>
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.1, -7.0]])
    ratios = torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.2, 3.0]])
    logp = (old + ratios.log()).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    return logp, old, adv, mask


def test_grpo_loss_by_hand():
    logp, old, adv, mask = _batch()
    # clip range [0.8, 1.3]; per token max(-A r, -A clip(r)):
    # row 0: max(-1.5, -1.3) = -1.3 (clipped), -0.9, -1.0
    # row 1: max(1.0, 1.6) = 1.6 (clipped), max(2.4, 2.4) = 2.4
    # token mean: (-1.3 - 0.9 - 1.0 + 1.6 + 2.4) / 5 = 0.16
    loss, stats = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.3)
    assert loss.item() == pytest.approx(0.16, abs=1e-6)
    assert stats.tokens == 5 and stats.clipped_tokens == 2
    loss.backward()
    # d/dlogp of -A r = -A r / 5 where unclipped, 0 where the clip is active, 0 on padding
    want = torch.tensor([[0.0, -0.9 / 5, -1.0 / 5], [0.0, 2.4 / 5, 0.0]])
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-6)


def test_grpo_loss_kl_term_and_normalizer():
    logp, old, adv, mask = _batch()
    ref = logp.detach().clone()
    ref[0, 0] += math.log(2.0)  # k3 = exp(ln 2) - ln 2 - 1 = 1 - ln 2; other tokens 0
    loss, stats = grpo_loss(logp, old, adv, mask, 0.2, 0.3, ref_logp=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(0.16 + 0.1 * (1 - math.log(2)) / 5, abs=1e-6)
    assert stats.kl_sum == pytest.approx(1 - math.log(2), abs=1e-6)
    # a micro-batch normalised by the whole batch's token count (here 10) halves the mean
    loss10, _ = grpo_loss(logp, old, adv, mask, 0.2, 0.3, normalizer=10.0)
    assert loss10.item() == pytest.approx(0.08, abs=1e-6)


def test_k3_is_nonnegative_and_zero_at_equality():
    x = torch.randn(100)
    y = torch.randn(100)
    assert (k3_kl(x, y) >= 0).all()
    assert k3_kl(x, x).abs().max() == 0


def test_grpo_loss_rejects_bad_shapes():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, adv[:1], mask, 0.2, 0.3)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, 0.2, 0.3, kl_coef=0.1)
