"""`python -m rrm_engine train`: runs GRPO steps, logs JSONL metrics, saves and resumes a checkpoint."""
import json
import warnings

import pytest
import torch

from rrm_engine.cli.main import main




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


@pytest.mark.parametrize("extra,message", [
    (["--steps", "0"], "--steps: must be an integer >= 1"),
    (["--group-size", "1"], "--group-size: must be an integer >= 2"),
    (["--lr", "0"], "--lr: must be a number > 0"),
    (["--top-p", "2"], "--top-p"),
    (["--eps-low", "-1"], "--eps-low"),
    (["--device", "cuda:7"], "--device"),
    (["--resume", "nowhere"], "not a checkpoint written by `train`"),
])
def test_train_cli_checks_arguments_before_loading(extra, message, tiny_qwen2_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}) + "\n")
    out = tmp_path / "run"
    if "--device" in extra and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(tiny_qwen2_dir), "--data", str(data), "--out", str(out), "--steps", "1", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # no empty run dir left behind


def test_train_cli_checks_data_and_out_before_loading(tiny_qwen2_dir, tmp_path, capsys, monkeypatch):
    import rrm_engine.model.loader
    monkeypatch.setattr(rrm_engine.model.loader, "load", lambda *a, **k: pytest.fail("loaded before the checks"))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}) + "\n\n"
                    + json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    out = tmp_path / "run"
    common = ["train", "--model", str(tiny_qwen2_dir), "--out", str(out), "--steps", "1"]
    assert main(common + ["--data", str(data)]) == 2
    assert f"{data}:3: chosen and rejected are identical" in capsys.readouterr().err  # the bad record's line
    with pytest.raises(SystemExit):
        main(common + ["--data", str(tmp_path / "missing.jsonl")])
    assert "file not found" in capsys.readouterr().err
    data.write_text(json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}) + "\n")
    (out / "checkpoint").mkdir(parents=True)
    assert main(common + ["--data", str(data)]) == 2
    assert "already holds a checkpoint; continue it with --resume" in capsys.readouterr().err
    assert not out.with_name("run.tmp").exists()


def test_optimizer_state_full_bf16_or_none(tiny_qwen2_dir, tmp_path):
    """--optimizer-state: the AdamW moments are most of a checkpoint. bf16 halves them, none drops
    them; both still resume (none restarts the moments, with a warning)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(3)))
    sizes = {}
    for mode in ("full", "bf16", "none"):
        out = tmp_path / mode
        common = ["train", "--model", str(tiny_qwen2_dir), "--data", str(data), "--out", str(out), "--group-size", "2",
                  "--pairs-per-step", "1", "--max-tokens", "2", "--lr", "1e-3", "--optimizer-state", mode]
        assert main(common + ["--steps", "1"]) == 0
        state = out / "checkpoint" / "trainer_state.pt"
        sizes[mode] = state.stat().st_size
        saved = torch.load(state, map_location="cpu", weights_only=False)
        assert saved["optimizer_state"] == mode and saved["step"] == 1
        if mode == "bf16":
            moments = [v for st in saved["optimizer"]["state"].values() for k, v in st.items() if k != "step"]
            assert moments and all(v.dtype == torch.bfloat16 for v in moments)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(common + ["--steps", "2", "--resume", str(out / "checkpoint")]) == 0
        assert any("holds no optimizer state" in str(w.message) for w in caught) == (mode == "none")
    model_bytes = (tmp_path / "full" / "checkpoint" / "model.safetensors").stat().st_size
    assert sizes["full"] > 1.9 * model_bytes  # two fp32 moments per parameter
    assert 0.45 * sizes["full"] < sizes["bf16"] < 0.55 * sizes["full"]
    assert sizes["none"] < 0.01 * sizes["full"]
