"""The memory plan and GRPO's trainer reserve on a real GPU, and tensor parallelism on two GPUs.
Skipped without CUDA (the two-GPU test also needs a second device).

What the CPU suite cannot check: that the allocator's real peak during a full-size step stays
under the profiled activation peak, that the decode CUDA graphs' pools are measured (> 0) and the
engine as a whole stays inside gpu_memory_utilization * total, and that the trainer's estimated
reserve covers a real bf16-autocast forward/backward + AdamW step. Every number is printed
(run with -s) so the session can record it.

A dry run of this file's code on the CPU (a fake device, tiny shapes, no memory assertions):
RRM_GPU_TEST_DEVICE=cpu python -m pytest -q tests/gpu/test_memory_gpu.py
"""
from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("RRM_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a GPU (RRM_GPU_TEST_DEVICE=cpu: dry run)")
GPU = DEVICE == "cuda"
GiB, MiB = 1 << 30, 1 << 20
# RRM-7B (Qwen2-7B) shapes on a GPU; a tiny model of the same family for the CPU dry run
SHAPE = (dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
              intermediate_size=18944, vocab_size=152064) if GPU else
         dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=1000))


class DryRunProbe:
    """The CPU dry run's device: 4 GiB, all free, a 100 MiB activation peak."""

    def total(self) -> int:
        return 4 * GiB

    def free(self) -> int:
        return 4 * GiB

    def allocated(self) -> int:
        return 0

    def peak_allocated(self) -> int:
        return 100 * MiB

    def reset_peak(self) -> None:
        pass


def random_decoder(dtype: torch.dtype):
    """A LoadedModel of random weights with SHAPE, materialised once on the device in dtype."""
    from rrm_engine.model.config import ModelConfig
    from rrm_engine.model.loader import LoadedModel
    from rrm_engine.model.decoder import Decoder
    cfg = ModelConfig.from_hf(dict(SHAPE, architectures=["Qwen2ForCausalLM"], max_position_embeddings=32768,
                                   rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False))
    with torch.device("meta"):
        dec = Decoder(cfg).to(dtype)
    dec.to_empty(device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=g)
    return LoadedModel(model=dec.eval(), tokenizer=None, config=cfg, eos_token_ids=(2,), name="random")


def test_memory_plan_holds_for_a_full_step_and_graphs():
    import rrm_engine as rrm
    dtype = torch.bfloat16 if GPU else torch.float32
    if GPU:
        torch.cuda.empty_cache()
        free0, total = torch.cuda.mem_get_info()
    loaded = random_decoder(dtype)
    u, tokens, seqs = 0.5, 2048, 64
    llm = rrm.LLM(loaded, gpu_memory_utilization=u, max_num_batched_tokens=tokens, max_num_seqs=seqs,
                  cuda_graphs=True, memory_probe=None if GPU else DryRunProbe())
    plan = llm.memory_plan()
    print("\nplan", plan)
    assert plan["how"] == "profiled" and plan["num_blocks"] * plan["block_size"] >= tokens
    # a step as large as the profiled one: `seqs` prompts of tokens / seqs tokens, then decode at `seqs` rows
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(tokens // seqs)] for i in range(seqs)]
    params = rrm.SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=16, ignore_eos=True, seed=1)
    if GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    outs = llm.generate(prompts, params)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    if not GPU:
        return
    step_peak = torch.cuda.max_memory_allocated() - before
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    used = free0 - torch.cuda.mem_get_info()[0]  # everything this test holds now: weights, cache, graphs
    print(f"step peak {step_peak / MiB:.0f} MiB vs profiled {plan['activations_peak_bytes'] / MiB:.0f} MiB; "
          f"graphs {plan['graphs_bytes'] / MiB:.0f} MiB; engine uses {used / GiB:.2f} GiB of its "
          f"{plan['budget_bytes'] / GiB:.2f} GiB budget ({u} x {total / GiB:.1f} GiB)")
    assert plan["graphs_bytes"] > 0 and plan["activations_peak_bytes"] > 0
    assert step_peak <= plan["activations_peak_bytes"] * 1.05 + 64 * MiB  # the profiled step was the largest
    assert used <= plan["budget_bytes"] + 512 * MiB  # slack: cuBLAS workspaces, allocator rounding


def test_trainer_reserve_covers_a_real_training_step(tiny_qwen2_dir):
    """The estimate for one micro-batch (gradients, AdamW state, activations) against the allocator's
    peak over a bf16-autocast forward/backward and an AdamW step at the same shapes."""
    from rrm_engine.model.loader import load_hf
    from rrm_engine.train.logprobs import pack, response_logprobs
    from rrm_engine.train.memory import estimate_trainer_memory
    model = load_hf(tiny_qwen2_dir, device=DEVICE, dtype=torch.float32).model.train()
    mb, seq = (8, 1024) if GPU else (2, 32)
    est = estimate_trainer_memory(model, micro_batch_size=mb, seq_len=seq, gradient_checkpointing=False,
                                  logprob_chunk_size=1024, activation_bytes=2 if GPU else 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = pack([[5] * (seq // 2)] * mb, [[6] * (seq - seq // 2)] * mb, DEVICE)
    if GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=GPU):
        logp = response_logprobs(model, batch, 1.0, 1024)
    logp.sum().backward()
    opt.step()
    if not GPU:
        return
    measured = torch.cuda.max_memory_allocated() - before
    print(f"\ntrainer step peak {measured / MiB:.0f} MiB, estimated reserve {est.total / MiB:.0f} MiB {est.as_dict()}")
    assert measured <= est.total


@pytest.mark.skipif(not GPU or torch.cuda.device_count() < 2, reason="tensor parallelism needs 2 GPUs")
def test_tensor_parallel_on_two_gpus_matches_one(tiny_qwen2_dir):
    """LLM(path, tensor_parallel_size=2) spawns two NCCL ranks (cuda:0, cuda:1); greedy bf16 tokens
    as one GPU gives them (a near-tie may part them late: compare the first 8)."""
    import rrm_engine as rrm
    prompts = [list(range(100, 140)), [7, 8, 9, 10, 11]]
    sp = rrm.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    one = rrm.LLM(str(tiny_qwen2_dir), kv_cache_tokens=4096)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, sp)]
    del one
    two = rrm.LLM(str(tiny_qwen2_dir), kv_cache_tokens=4096, tensor_parallel_size=2)
    try:
        assert [o.outputs[0].token_ids for o in two.generate(prompts, sp)] == want
        print("\nTP=2 plan of rank 0:", two.memory_plan())
    finally:
        two.engine.shutdown()
