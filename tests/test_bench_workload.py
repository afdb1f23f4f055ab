"""bench.throughput says when, and why, its texts are synthetic (no PandaLM test set found)."""
from __future__ import annotations

from bench import throughput
from bench.workload import make_workload
from rrm_engine.judge.prompt import PromptBuilder


def test_missing_pandalm_is_said_not_silent(tmp_path, smollm2_tokenizer, tiny_qwen2_dir, capsys):
    missing = tmp_path / "nowhere" / "pandalm.json"
    work = make_workload(PromptBuilder(smollm2_tokenizer), 1, 2, 120, pandalm=missing)
    assert work.source == "synthetic" and str(missing) in work.why and "--pandalm" in work.why
    throughput.main(["--model", str(tiny_qwen2_dir), "--systems", "c", "--queries", "1", "--candidates", "2",
                     "--votes", "2", "--gen-len", "2", "--prompt-len", "120", "--pandalm", str(missing)])
    out = capsys.readouterr().out
    assert f"[workload] synthetic text: the PandaLM test set was not found at {missing}" in out
