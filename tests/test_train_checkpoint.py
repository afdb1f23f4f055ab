"""Checkpoints: the saved model loads in transformers and in rrm_engine's loader; save + resume +
continue gives the same next step as an uninterrupted run."""
import json

import pytest
import torch

from rrm_engine.model.loader import load_hf
from rrm_engine.train.checkpoint import TRAINER_STATE, resume, save_checkpoint, save_model
from rrm_engine.train.data import PairStream
from rrm_engine.train.engine_sampler import EngineSampler
from rrm_engine.train.trainer import GRPOTrainer, TrainConfig

SHORT = dict(system=None, user_template="{question}\n1: {answer1}\n2: {answer2}\n")




@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parity(text, *_):  # mixed rewards so every step moves the weights
    return 1 + len(text) % 2


def _trainer(model_dir, pairs_file):
    loaded = load_hf(model_dir)
    cfg = TrainConfig(pairs_per_step=2, group_size=2, lr=1e-2, max_tokens=3, seed=5, **SHORT)
    sampler = EngineSampler.around(loaded, cfg.temperature, cfg.top_p, cfg.max_tokens)
    return GRPOTrainer(loaded.model, loaded.tokenizer, PairStream(pairs_file, seed=1), sampler, cfg,
                       verdict_fn=_parity)


def test_saved_model_loads_in_transformers_and_loader(tiny_qwen2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    loaded = load_hf(tiny_qwen2_dir)
    with torch.no_grad():  # make it differ from the source checkpoint
        # a view into the fused gate_up_proj: the change must reach the saved up_proj and nothing else
        loaded.model.state_dict()["model.layers.0.mlp.up_proj.weight"].mul_(1.5)
    out = tmp_path / "saved"
    save_model(loaded.model, out, loaded.tokenizer)
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ours = loaded.model.compute_logits(loaded.model(ids, pos))
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-4)
    again = load_hf(out)
    for (n1, p1), (n2, p2) in zip(loaded.model.state_dict().items(), again.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert AutoTokenizer.from_pretrained(str(out)).encode("hello world") == loaded.tokenizer.encode("hello world")


def test_resume_continues_exactly(tiny_qwen2_dir, pairs_file, tmp_path):
    straight = _trainer(tiny_qwen2_dir, pairs_file)
    m = [straight.step() for _ in range(3)]

    first = _trainer(tiny_qwen2_dir, pairs_file)
    for _ in range(2):
        first.step()
    ckpt = save_checkpoint(first, tmp_path / "ckpt")
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file() and (ckpt / TRAINER_STATE).is_file()
    save_checkpoint(first, tmp_path / "ckpt")  # overwriting an existing checkpoint is fine

    # a fresh trainer on the initial weights; resume copies the saved ones into its Decoder in place
    # (the CLI instead loads the checkpoint dir as the model: tests/test_train_cli.py)
    resumed = _trainer(tiny_qwen2_dir, pairs_file)
    resume(resumed, ckpt)
    assert resumed.step_count == 2
    r = resumed.step()
    assert r["step"] == 3
    for key in ("loss", "reward_mean", "response_len_mean"):
        assert r[key] == pytest.approx(m[2][key], abs=1e-5), key
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_resume_rejects_a_different_config(tiny_qwen2_dir, pairs_file, tmp_path):
    tr = _trainer(tiny_qwen2_dir, pairs_file)
    ckpt = save_checkpoint(tr, tmp_path / "ckpt")
    other = _trainer(tiny_qwen2_dir, pairs_file)
    other.cfg = TrainConfig(**{**other.config_dict(), "group_size": 4, "betas": (0.9, 0.999)})
    with pytest.raises(ValueError, match="group_size"):
        resume(other, ckpt)
    with pytest.raises(FileNotFoundError, match="trainer_state"):
        resume(tr, tiny_qwen2_dir)
