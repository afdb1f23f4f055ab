"""`python -m rrm_engine train`: runs GRPO steps, logs JSONL metrics, saves and resumes a checkpoint."""
import json

import pytest

from rrm_engine.cli import main




def test_train_cli_logs_saves_and_resumes(tiny_qwen2_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(3)))
    out = tmp_path / "run"
    common = ["train", "--model", str(tiny_qwen2_dir), "--data", str(data), "--out", str(out), "--group-size", "2",
              "--pairs-per-step", "1", "--max-tokens", "2", "--lr", "1e-3", "--kl-coef", "0.05"]
    assert main(common + ["--steps", "2"]) == 0
    ckpt = out / "checkpoint"
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert main(common + ["--steps", "3", "--resume", str(ckpt)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "invalid_rate", "kl", "clip_fraction", "entropy", "response_len_mean",
                "tokens_per_s", "logprob_mismatch_max"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[0]["invalid_rate"] == 1.0  # a random tiny model never writes a verdict: reward -1
    assert rows[0]["reward_mean"] == -1.0


def test_train_cli_rejects_bad_arguments(tiny_qwen2_dir, tmp_path):
    with pytest.raises(Exception, match="not found"):
        main(["train", "--model", str(tiny_qwen2_dir), "--data", str(tmp_path / "missing.jsonl"),
              "--out", str(tmp_path / "o"), "--steps", "1"])
    with pytest.raises(SystemExit):
        main(["train", "--model", str(tiny_qwen2_dir), "--data", str(tmp_path), "--out", str(tmp_path), "--steps", "0"])
