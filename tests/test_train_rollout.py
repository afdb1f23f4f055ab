"""Rollouts: random presentation order per rollout, verdict mapped back, +1/-1 reward."""
import random

import pytest

from rrm_engine.judge.prompt import SYSTEM
from rrm_engine.model.loader import load_hf
from rrm_engine.train.data import PreferencePair
from rrm_engine.train.engine_sampler import EngineSampler
from rrm_engine.train.rollout import RolloutCollector, RolloutConfig, reward_for, rrm_verdict


def test_reward_maps_the_verdict_back_through_the_order():
    assert reward_for(1, swapped=False) == 1.0   # chosen shown first, judge says 1
    assert reward_for(2, swapped=True) == 1.0    # chosen shown second, judge says 2
    assert reward_for(2, swapped=False) == -1.0
    assert reward_for(1, swapped=True) == -1.0
    assert reward_for(None, swapped=False) == reward_for(None, swapped=True) == -1.0  # invalid


def test_rrm_verdict_rules():
    assert rrm_verdict("hmm \\boxed{Assistant 2}</think> \\boxed{Assistant 1}", "stop", True) == 1
    assert rrm_verdict("\\boxed{Assistant 2}", "stop", True) is None  # no </think>: invalid
    assert rrm_verdict("\\boxed{Assistant 2}", "stop", False) == 2  # template without a thinking section


def test_prompts_use_the_rrm_format_and_swap(smollm2_tokenizer):
    c = RolloutCollector(smollm2_tokenizer, RolloutConfig(group_size=2))
    pair = PreferencePair("Which is bigger, 3 or 4?", "4 is bigger {answer2}", "3 is bigger")
    straight = smollm2_tokenizer.decode(c.prompt_ids(pair, False)[0])
    swapped = smollm2_tokenizer.decode(c.prompt_ids(pair, True)[0])
    assert SYSTEM.strip() in straight
    assert "### Assistant 1\n\n4 is bigger {answer2}\n\n\n### Assistant 2\n\n3 is bigger" in straight
    assert "### Assistant 1\n\n3 is bigger\n\n\n### Assistant 2\n\n4 is bigger {answer2}" in swapped
    with pytest.raises(ValueError, match="group_size"):
        RolloutCollector(smollm2_tokenizer, RolloutConfig(group_size=1))


def test_collect_draws_an_order_per_rollout(tiny_qwen2_dir):
    loaded = load_hf(tiny_qwen2_dir)
    cfg = RolloutConfig(group_size=8, max_tokens=1, system=None, user_template="{question}|{answer1}|{answer2}")
    sampler = EngineSampler.around(loaded, cfg.temperature, cfg.top_p, cfg.max_tokens)
    c = RolloutCollector(loaded.tokenizer, cfg, verdict_fn=lambda text, *_: 1 + len(text) % 2)
    pairs = [PreferencePair(f"q{i}", "good", "bad") for i in range(4)]
    rollouts = c.collect(sampler, pairs, random.Random(0))
    assert [r.group for r in rollouts] == [g for g in range(4) for _ in range(8)]
    swaps = [r.swapped for r in rollouts]
    assert 8 <= sum(swaps) <= 24  # about half of 32 (fixed by the seed)
    assert any(len({r.swapped for r in rollouts[g * 8:(g + 1) * 8]}) == 2 for g in range(4))  # mixed in a group
    for r in rollouts:
        assert r.prompt_ids == c.prompt_ids(pairs[r.group], r.swapped)[0]
        assert len(r.completion.token_ids) == 1 and len(r.completion.logprobs) == 1
        assert r.reward == reward_for(r.verdict, r.swapped)
