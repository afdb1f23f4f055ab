"""TrainConfig.trainable: "last_n:K" trains only the last K decoder layers + final norm (+ an untied
LM head); everything below is frozen, gets no gradient and does not move in a GRPO step."""
import json

import pytest

from rrm_engine.model.config import ModelConfig
from rrm_engine.model.loader import load_hf
from rrm_engine.model.decoder import Decoder
from rrm_engine.train.data import PairStream
from rrm_engine.train.engine_sampler import EngineSampler
from rrm_engine.train.trainable import apply_trainable, parse_trainable
from rrm_engine.train.trainer import GRPOTrainer, TrainConfig

SHORT = dict(system=None, user_template="{question}\n1: {answer1}\n2: {answer2}\n")




def test_parse_trainable():
    assert parse_trainable("all") is None
    assert parse_trainable("last_n:3") == 3
    for bad in ("last_n:0", "last_n:", "last_n:-1", "last:2", "some", ""):
        with pytest.raises(ValueError, match="last_n:K"):
            parse_trainable(bad)
    with pytest.raises(ValueError, match="trainable"):
        TrainConfig(trainable="last_n:x").validate()


def _tiny_decoder(tied: bool) -> Decoder:
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=32,
                      num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4,
                      max_position_embeddings=64, tie_word_embeddings=tied, qkv_bias=False, qk_norm=False)
    return Decoder(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_last_n_flags(tied):
    model = _tiny_decoder(tied)
    apply_trainable(model, "last_n:1")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith("model.layers.2.")} | {"model.norm.weight"}
    if not tied:  # a tied head is the input embedding: it stays frozen (see trainable.py)
        expected.add("lm_head.weight")
    assert trained == expected
    with pytest.raises(ValueError, match="only 3 decoder layers"):
        apply_trainable(_tiny_decoder(tied), "last_n:4")
    fresh = _tiny_decoder(tied)
    apply_trainable(fresh, "all")  # leaves the flags alone
    assert all(p.requires_grad for p in fresh.parameters())


def test_grpo_step_moves_only_the_trained_layers(tiny_qwen2_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(2)))
    loaded = load_hf(tiny_qwen2_dir)
    cfg = TrainConfig(pairs_per_step=2, group_size=4, lr=1e-2, max_tokens=3, trainable="last_n:1", **SHORT)
    sampler = EngineSampler.around(loaded, cfg.temperature, cfg.top_p, cfg.max_tokens)
    tr = GRPOTrainer(loaded.model, loaded.tokenizer, PairStream(data), sampler, cfg,
                     verdict_fn=lambda text, *_: 1 + len(text) % 2)  # mixed rewards: non-zero advantages
    assert {id(p) for g in tr.optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in tr.model.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    m = tr.step()
    assert m["grad_norm"] > 0
    for n, p in tr.model.named_parameters():
        moved = (p - before[n]).abs().max().item()
        if n.startswith("model.layers.1.") or n in ("model.norm.weight", "lm_head.weight"):
            assert moved > 1e-4, n  # trained (lr 1e-2)
        else:
            assert moved == 0.0, n


def test_cli_rejects_a_bad_trainable(tmp_path, capsys):
    from rrm_engine.cli.main import main
    data = tmp_path / "unused.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(SystemExit) as e:  # an argument error, before anything loads
        main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1", "--trainable", "last_n:0"])
    assert e.value.code == 2 and "last_n:K" in capsys.readouterr().err
