"""GRPO memory: the trainer's reserve (estimated against what autograd really saves), the rollout
engine's share of a fake device, and bf16 rollouts from a copy that follows every optimizer step."""
from __future__ import annotations

import pytest
import torch

from rrm_engine.model.loader import load_hf
from rrm_engine.core.memory_plan import GiB, InsufficientMemoryError
from rrm_engine.train.engine_sampler import EngineSampler
from rrm_engine.train.logprobs import pack, response_logprobs
from rrm_engine.train.memory import TrainerMemory, estimate_trainer_memory, rollout_memory_utilization
from rrm_engine.train.trainable import apply_trainable
from test_memory_plan import FakeProbe

MiB = 1 << 20


def saved_activation_bytes(model, batch_size: int, seq_len: int) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward (each storage
    once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    half = seq_len // 2
    batch = pack([[1] * half] * batch_size, [[2] * (seq_len - half)] * batch_size, "cpu")
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        response_logprobs(model, batch, 1.0, chunk_size=1)
    return sum(seen.values())


@pytest.fixture(scope="module")
def policy(tiny_qwen2_dir):
    return load_hf(tiny_qwen2_dir).model.train()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_covers_what_autograd_saves(policy, checkpointing):
    policy.gradient_checkpointing = checkpointing
    try:
        measured = saved_activation_bytes(policy, 3, 80)
    finally:
        policy.gradient_checkpointing = False
    est = estimate_trainer_memory(policy, micro_batch_size=3, seq_len=80, gradient_checkpointing=checkpointing,
                                  logprob_chunk_size=1, activation_bytes=4)
    assert est.saved_activations >= measured
    if not checkpointing:  # a recomputed layer's tensors are saved only during backward: not seen here
        assert est.saved_activations <= 1.3 * measured, (est.saved_activations, measured)


def test_gradients_and_adamw_cover_the_trained_parameters_only(tiny_qwen2_dir):
    model = load_hf(tiny_qwen2_dir).model
    kw = dict(micro_batch_size=1, seq_len=16, gradient_checkpointing=False, logprob_chunk_size=16, activation_bytes=4)
    full = estimate_trainer_memory(model, **kw)
    assert full.gradients == sum(p.numel() * 4 for p in model.parameters())
    assert full.optimizer == 3 * full.gradients  # two moments + the foreach step's temporaries
    apply_trainable(model, "last_n:1")
    top = estimate_trainer_memory(model, **kw)
    trained = model.model.layers[-1].parameters(), model.model.norm.parameters(), model.lm_head.parameters()
    assert top.gradients == sum(p.numel() * 4 for ps in trained for p in ps) < full.gradients


def test_rollouts_get_what_the_trainer_leaves():
    probe = FakeProbe(total=80 * GiB, free=70 * GiB, activations=0)  # 10 GiB in use: policy, context
    trainer = TrainerMemory(gradients=4 * GiB, optimizer=12 * GiB, saved_activations=3 * GiB, transient=GiB)
    assert rollout_memory_utilization(probe, trainer, 0.9) == pytest.approx((72 - 10 - 20) / 80)
    given = TrainerMemory(0, 0, 0, 0, given=30 * GiB)
    assert rollout_memory_utilization(probe, given, 0.9) == pytest.approx((72 - 10 - 30) / 80)


def test_a_trainer_that_leaves_nothing_names_its_parts():
    probe = FakeProbe(total=80 * GiB, free=70 * GiB, activations=0)
    trainer = TrainerMemory(gradients=28 * GiB, optimizer=84 * GiB, saved_activations=GiB, transient=GiB)
    with pytest.raises(InsufficientMemoryError, match=r"gradients 28\.00 GiB \+ AdamW 84\.00 GiB \+ activations "
                                                      r"2\.00 GiB .estimated.*need at least 1\.5[0-9] of the device"):
        rollout_memory_utilization(probe, trainer, 0.9)


def test_bf16_rollouts_follow_every_optimizer_step(tiny_qwen2_dir):
    loaded = load_hf(tiny_qwen2_dir)
    policy = loaded.model
    probe = FakeProbe(total=256 * MiB, free=256 * MiB, activations=MiB)
    sampler = EngineSampler.around(loaded, 1.0, 1.0, 4, rollout_dtype=torch.bfloat16, memory_probe=probe,
                                   gpu_memory_utilization=0.5, max_num_batched_tokens=64, max_num_seqs=8)
    served = sampler.llm.engine.model
    assert served is not policy and sampler.llm.engine.cache.k.dtype == torch.bfloat16
    assert sampler.llm.memory_plan()["weights_bytes"] == sum(p.numel() * 2 for p in policy.parameters())
    comps = sampler.sample([[5, 6, 7], [5, 6, 7], [9, 10]], seed=3)
    assert all(len(c.token_ids) == len(c.logprobs) > 0 for c in comps)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    batch = pack([[5, 6, 7]], [comps[0].token_ids], "cpu")
    response_logprobs(policy, batch).sum().backward()
    opt.step()
    before = served.model.layers[0].mlp.gate_up_proj.weight.clone()
    sampler.invalidate_prefix_cache()
    for (name, p), q in zip(policy.named_parameters(), served.parameters()):
        assert torch.equal(q, p.detach().to(torch.bfloat16)), name
    assert not torch.equal(before, served.model.layers[0].mlp.gate_up_proj.weight)
    assert not any(p.requires_grad for p in served.parameters())


def test_train_cli_reserves_the_trainer_first(tiny_qwen2_dir, tmp_path, capsys):
    """The CLI's GPU path on a fake 1 GiB device: the reserve is the estimate (or --trainer-memory-gb)
    and the engine's utilization what it leaves of --gpu-memory-utilization."""
    from rrm_engine.cli.main import build_parser
    from rrm_engine.cli.train import _rollout_memory
    from rrm_engine.train.trainer import TrainConfig
    model = load_hf(tiny_qwen2_dir).model
    data = tmp_path / "d.jsonl"  # the parser checks that --data exists
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    base = ["train", "--data", str(data), "--out", str(tmp_path), "--steps", "1", "--max-tokens", "64",
            "--micro-batch-size", "2", "--max-prompt-tokens", "192", "--gpu-memory-utilization", "0.8"]
    cfg = TrainConfig(max_tokens=64, micro_batch_size=2)
    probe = FakeProbe(total=GiB, free=GiB - 100 * MiB, activations=0)
    est = estimate_trainer_memory(model, micro_batch_size=2, seq_len=256, gradient_checkpointing=False,
                                  logprob_chunk_size=cfg.logprob_chunk_size, activation_bytes=2)
    got = _rollout_memory(build_parser().parse_args(base), model, cfg, probe)
    assert got == {"gpu_memory_utilization": pytest.approx((int(0.8 * GiB) - 100 * MiB - est.total) / GiB)}
    assert "trainer reserve" in capsys.readouterr().err
    got = _rollout_memory(build_parser().parse_args(base + ["--trainer-memory-gb", "0.25"]), model, cfg, probe)
    assert got == {"gpu_memory_utilization": pytest.approx((int(0.8 * GiB) - 100 * MiB - GiB // 4) / GiB)}
