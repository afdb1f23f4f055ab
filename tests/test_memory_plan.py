"""The memory plan: KV-cache sizing from a device budget, checked on CPU with a fake memory probe.

The arithmetic (plan_kv_cache) is checked against numbers worked out by hand; the start-up path
(LLM with memory_probe=) runs the real profiling step of the tiny model on CPU, reads the fake
probe, and must build its cache, print its plan and fail with the amount it needs.
"""
from __future__ import annotations

import pytest
import torch

import rrm_engine as rrm
from rrm_engine.core.memory_plan import GiB, InsufficientMemoryError, plan_kv_cache
from rrm_engine.core.memory_profile import profile_step_shape, weights_bytes

MiB = 1 << 20


class FakeProbe:
    """A device of `total` bytes with `free` of them free; the profiling step appears to peak at
    `activations` bytes above what was allocated before it. Records the order of the calls."""

    def __init__(self, total: int, free: int, activations: int):
        self._total, self._free, self._activations = total, free, activations
        self.calls: list[str] = []

    def total(self) -> int:
        return self._total

    def free(self) -> int:
        self.calls.append("free")
        return self._free

    def allocated(self) -> int:
        self.calls.append("allocated")
        return 5 * MiB

    def peak_allocated(self) -> int:
        self.calls.append("peak")
        return 5 * MiB + self._activations

    def reset_peak(self) -> None:
        self.calls.append("reset")


PLAN = dict(device="cuda:0", gpu_memory_utilization=0.5, weights=1 * GiB, activations=GiB // 2, graphs=GiB // 4,
            kv_bytes_per_token=1024, block_size=16, min_tokens=2048)


def test_budget_bound_plan_worked_by_hand():
    # budget 5 GiB - 1.75 GiB = 3.25 GiB = 212992 blocks of 16 KiB, one of them the scratch block
    plan = plan_kv_cache(total=10 * GiB, free=8 * GiB, **PLAN)
    assert plan.limited_by == "budget" and plan.how == "profiled"
    assert plan.num_blocks == 212991 and plan.kv_cache_tokens == 212991 * 16
    assert plan.kv_cache_bytes == 212992 * 16 * 1024
    assert plan.left_bytes == 0 and plan.budget_bytes == 5 * GiB
    d = plan.as_dict()
    assert d["weights_bytes"] == GiB and d["graphs_bytes"] == GiB // 4 and d["kv_cache_tokens"] == 212991 * 16


def test_free_memory_bound_plan_worked_by_hand():
    # 2 GiB free with the weights resident - 0.75 GiB = 1.25 GiB = 81920 blocks; 2 GiB of the budget unused
    plan = plan_kv_cache(total=10 * GiB, free=2 * GiB, **PLAN)
    assert plan.limited_by == "free memory"
    assert plan.num_blocks == 81919
    assert plan.left_bytes == 5 * GiB - GiB - GiB // 2 - GiB // 4 - 81920 * 16 * 1024


def test_too_small_a_budget_names_what_it_needs():
    # needs 1.75 GiB + 129 blocks of 16 KiB (2048 tokens and the scratch block) = 1.752 GiB of 2 GiB total
    with pytest.raises(InsufficientMemoryError) as e:
        plan_kv_cache(total=2 * GiB, free=2 * GiB, **PLAN)
    msg = str(e.value)
    assert "1.75 GiB" in msg and "gpu_memory_utilization=0.5 allows 1.00 GiB of 2.00 GiB" in msg
    assert "raise gpu_memory_utilization to at least 0.88" in msg
    assert "KV cache for 2048 tokens" in msg


def test_too_little_free_memory_names_other_users():
    with pytest.raises(InsufficientMemoryError, match="only 1.50 GiB is free for it .weights included. of 80.00 GiB"):
        plan_kv_cache(total=80 * GiB, free=GiB // 2, **PLAN)


def test_given_kv_cache_tokens_is_kept_or_refused():
    plan = plan_kv_cache(total=10 * GiB, free=8 * GiB, kv_cache_tokens=1000, **PLAN)
    assert plan.how == "kv_cache_tokens" and plan.kv_cache_tokens == 992 and plan.num_blocks == 62
    with pytest.raises(InsufficientMemoryError, match="kv_cache_tokens=10000000 needs 9.54 GiB"):
        plan_kv_cache(total=10 * GiB, free=8 * GiB, kv_cache_tokens=10_000_000, **PLAN)


@pytest.mark.parametrize("u", [0.0, -0.1, 1.5, True, "0.9"])
def test_utilization_must_be_a_fraction(u):
    with pytest.raises(ValueError, match="gpu_memory_utilization must be a fraction in"):
        plan_kv_cache(total=10 * GiB, free=8 * GiB, **dict(PLAN, gpu_memory_utilization=u))


def test_profile_step_spreads_the_token_budget():
    assert profile_step_shape(2048, 256, 32768) == [8] * 256
    assert profile_step_shape(10, 4, 100) == [3, 3, 2, 2]
    assert profile_step_shape(2048, 1, 1000) == [999]  # one sequence cannot exceed the context


def test_llm_sizes_its_cache_from_the_fake_device(tiny_qwen2_dir, capsys):
    probe = FakeProbe(total=2 * GiB, free=2 * GiB, activations=300 * MiB)
    llm = rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, memory_probe=probe,
                  gpu_memory_utilization=0.25, max_num_batched_tokens=96, max_num_seqs=8, block_size=16)
    plan = llm.memory_plan()
    weights = weights_bytes(llm.engine.model)
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, fp32
    assert plan["weights_bytes"] == weights and plan["kv_bytes_per_token"] == per_token
    assert plan["activations_peak_bytes"] == 300 * MiB and plan["graphs_bytes"] == 0
    assert plan["num_blocks"] == (GiB // 2 - weights - 300 * MiB) // (16 * per_token) - 1
    assert llm.engine.cache.k.shape[1] == plan["num_blocks"] + 1  # the scratch block
    assert probe.calls[:3] == ["reset", "allocated", "peak"]  # the peak is read around the profiling step
    err = capsys.readouterr().err
    assert "memory plan (cpu, profiled)" in err and f"{plan['kv_cache_tokens']} tokens" in err
    out = llm.generate([[5, 6, 7]], rrm.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_profiling_step_is_the_largest_step(tiny_qwen2_dir):
    """The profiled forward carries max_num_batched_tokens tokens and one LM-head row per sequence."""
    from rrm_engine.model.loader import load
    from rrm_engine.core.memory_profile import profile_activations
    model = load(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32).model
    seen: dict[str, int] = {}
    forward, logits = model.forward, model.compute_logits
    model.forward = lambda ids, *a, **k: (seen.setdefault("tokens", ids.shape[0]), forward(ids, *a, **k))[1]
    model.compute_logits = lambda h: (seen.setdefault("rows", h.shape[0]), logits(h))[1]
    assert profile_activations(model, FakeProbe(GiB, GiB, 7), max_num_batched_tokens=100, max_num_seqs=12,
                               block_size=16) == 7
    assert seen == {"tokens": 100, "rows": 12}


def test_llm_without_memory_for_one_step_says_how_much(tiny_qwen2_dir):
    probe = FakeProbe(total=GiB, free=GiB, activations=900 * MiB)
    with pytest.raises(InsufficientMemoryError, match=r"raise gpu_memory_utilization to at least 0\.9[0-9]"):
        rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, memory_probe=probe,
                gpu_memory_utilization=0.9, max_num_batched_tokens=64, max_num_seqs=4)


def test_graph_capture_runs_at_every_batch_size(tiny_qwen2_dir):
    """cuda_graphs=True: the measurement captures (on CPU: runs) one decode step per padded size
    through StaticDecode; the engine then decodes as without graphs."""
    probe = FakeProbe(total=128 * MiB, free=128 * MiB, activations=MiB)
    kw = dict(device="cpu", dtype=torch.float32, max_num_batched_tokens=64, max_num_seqs=5)
    graphs = rrm.LLM(str(tiny_qwen2_dir), memory_probe=probe, cuda_graphs=True, **kw)
    assert graphs.memory_plan()["graphs_bytes"] == 0  # nothing captured off CUDA
    plain = rrm.LLM(str(tiny_qwen2_dir), kv_cache_tokens=1024, **kw)
    prompts = [[1, 2, 3], [9, 8, 7, 6], [4] * 20]
    sp = rrm.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in graphs.generate(prompts, sp)] == \
        [o.outputs[0].token_ids for o in plain.generate(prompts, sp)]


def test_cpu_default_plan_has_no_device_numbers(tiny_qwen2_dir, capsys):
    llm = rrm.LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=1000)
    plan = llm.memory_plan()
    assert plan["how"] == "kv_cache_tokens" and plan["kv_cache_tokens"] == 992 and plan["total_bytes"] is None
    assert "memory plan" not in capsys.readouterr().err  # printed only when sized from a device
