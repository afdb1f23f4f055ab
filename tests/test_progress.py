"""Progress wherever a person waits: the CLI per comparison (not per batch), the demo's stages, the
opt-in bars of LLM.generate and Judge batches, and the on_result hook that streams them. (The
first-load conversion message is tested in test_loader.py.)"""
from __future__ import annotations

import re

import pytest

import rrm_engine as rrm
from cli_helpers import run_cli, write_jsonl
from rrm_engine.cli.main import main

ITEMS = [("2+2?", "4", "5"), ("Capital of Italy?", "Rome", "Milan"), ("Largest planet?", "Jupiter", "Mars")]


@pytest.fixture(scope="module")
def tiny_llm(tiny_qwen2_dir):
    return rrm.LLM(tiny_qwen2_dir, device="cpu", kv_cache_tokens=1024)


def test_cli_bar_moves_per_comparison(tmp_path, tiny_qwen2_dir):
    """All three items go to the engine in one batch (--batch-size 32), yet the bar counts each one as
    it finishes: 1/3, 2/3, 3/3 (it used to sit at 0% and jump to 100% per batch)."""
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"query": q, "a": a, "b": b} for q, a, b in ITEMS])
    res = run_cli("judge", "--pairs", str(pairs), "--out", str(tmp_path / "o.jsonl"), "--model", str(tiny_qwen2_dir),
                  "--max-tokens", "2", "--device", "cpu", TQDM_MININTERVAL="0")
    assert res.returncode == 0, res.stderr
    seen = set(re.findall(r"compare:\s+\d+%\|[^|]*\|\s*(\d)/3", res.stderr))
    assert seen >= {"1", "2", "3"}, res.stderr


def test_demo_says_what_it_is_doing(tiny_qwen2_dir, capsys):
    assert main(["demo", "--model", str(tiny_qwen2_dir), "--max-tokens", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "demo: 2 comparisons, 1 vote(s) each, up to 2 tokens per vote" in err
    assert "demo: knockout ranking of 4 candidates (3 matches)" in err
    assert "compare" in err and "rank (knockout)" in err  # the two bars


def test_generate_bar_is_opt_in_and_counts_tokens(tiny_llm, capsys):
    params = rrm.SamplingParams(n=2, temperature=0.6, max_tokens=6, ignore_eos=True, seed=0)
    tiny_llm.generate([[5, 6, 7]], params)
    assert capsys.readouterr().err == ""
    tiny_llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=True)
    err = capsys.readouterr().err
    assert "generate" in err and "2/2" in err and "tokens=24" in err  # 2 prompts x n=2 x 6 tokens


def test_judge_batches_report_each_item(tiny_llm, capsys):
    judge = rrm.Judge(tiny_llm, max_tokens=2, seed=0)
    seen = []
    out = judge.compare_batch(ITEMS + [("", "a", "b")], errors="return", progress=True,
                              on_result=lambda i, c: seen.append((i, c.error is None)))
    assert sorted(seen) == [(0, True), (1, True), (2, True), (3, False)]  # every item, bad ones included, once
    assert [c.error is None for c in out] == [True, True, True, False]
    assert "compare" in capsys.readouterr().err
    ranked = []
    judge.rank_batch([("Best?", ["a", "b", "c"]), ("Worst?", ["x", "y"])], progress=True,
                     on_result=lambda i, r: ranked.append(i))
    assert sorted(ranked) == [0, 1] and "rank (knockout)" in capsys.readouterr().err
