"""Tensor parallelism through the engine: two gloo ranks on CPU give the logits and tokens of one process.

One tensor_parallel_launch (2 spawned processes) runs every check on both ranks, because starting
the processes (import torch + transformers) is most of the cost. The reference runs in the test
process on the same tiny Qwen2 (fp32). Logits are compared at 1e-5: fp32, the only difference is the
order of the row-parallel partial sums (|logits| = O(1)); a wrong shard (a head, bias or vocab slice
misplaced) moves them by O(0.1) or more.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rrm_engine import LLM, SamplingParams
from rrm_engine.distributed import shard_decoder, tensor_parallel_launch

ATOL = 1e-5
MAX_TOKENS = 20
KV_TOKENS = 1024


def _prompts() -> list[list[int]]:
    shared = [(37 * i + 11) % 49152 for i in range(40)]  # a prefix the engine shares between requests
    return [shared + [101, 102, 103], shared + [201, 202], [7, 8, 9, 10, 11, 12, 13], [999, 5, 77]]


def _dense_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (2, 9), generator=g)
    return ids, torch.arange(9).expand(2, 9)


def _run(model_dir: str, tensor_parallel_size: int) -> dict:
    """Everything one rank (or the single process) computes: logits of every engine step (the paged
    path with the engine's AttentionMetadata), dense-path logits, greedy tokens of LLM.generate."""
    torch.set_num_threads(1)
    llm = LLM(model_dir, device="cpu", dtype=torch.float32, kv_cache_tokens=KV_TOKENS, block_size=16,
              tensor_parallel_size=tensor_parallel_size)
    model = llm.engine.model
    steps: list[torch.Tensor] = []
    full = model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:  # the engine calls this once per step
        out = full(hidden)
        steps.append(out.detach().clone())
        return out

    model.compute_logits = recording
    outs = llm.generate(_prompts(), SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    model.compute_logits = full
    ids, pos = _dense_batch()
    with torch.no_grad():
        dense = model.compute_logits(model(ids, pos))
    return {"steps": steps, "dense": dense, "tokens": [o.outputs[0].token_ids for o in outs],
            "kv_heads": llm.engine.cache.k.shape[3], "cached": llm.metrics()["cached_prefix_tokens"]}


def tp_worker(model_dir: str, world: int) -> dict:
    """Runs on every rank (module level: spawn pickles it by name). Checks that the ranks agree on
    every token (SPMD: they must sample the same), then returns this rank's results."""
    res = _run(model_dir, world)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, res["tokens"])
    res["ranks_agree"] = all(g == res["tokens"] for g in gathered)
    try:  # a second sharding of the same decoder, or a size that is not the group's, must fail clearly
        LLM(model_dir, device="cpu", dtype=torch.float32, kv_cache_tokens=KV_TOKENS, tensor_parallel_size=world * 2)
        res["wrong_size_error"] = None
    except RuntimeError as e:
        res["wrong_size_error"] = str(e)
    return res


@pytest.fixture(scope="module")
def single(tiny_qwen2_dir) -> dict:
    return _run(str(tiny_qwen2_dir), 1)


@pytest.fixture(scope="module")
def two_ranks(tiny_qwen2_dir) -> dict:
    return tensor_parallel_launch(tp_worker, 2, str(tiny_qwen2_dir), 2, timeout=300)


def test_cache_holds_only_this_ranks_kv_heads(single, two_ranks):
    assert single["kv_heads"] == 2 and two_ranks["kv_heads"] == 1


def test_engine_step_logits_match_one_process(single, two_ranks):
    assert len(two_ranks["steps"]) == len(single["steps"]) > 1
    for a, b in zip(two_ranks["steps"], single["steps"]):
        assert a.shape == b.shape and a.shape[-1] == 49152
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_dense_logits_match_one_process(single, two_ranks):
    torch.testing.assert_close(two_ranks["dense"], single["dense"], atol=ATOL, rtol=0)


def test_greedy_tokens_match_and_ranks_agree(single, two_ranks):
    assert two_ranks["ranks_agree"]
    assert two_ranks["tokens"] == single["tokens"]
    assert all(len(t) == MAX_TOKENS for t in single["tokens"])
    assert single["cached"] > 0 and two_ranks["cached"] == single["cached"]  # the shared prefix was shared


def test_group_size_mismatch_names_the_launch(two_ranks):
    assert "process group has 2 ranks" in two_ranks["wrong_size_error"]
    assert "torchrun" in two_ranks["wrong_size_error"]


def test_tensor_parallel_without_a_group_is_a_clear_error(tiny_qwen2_dir):
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group.*torchrun"):
        LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=KV_TOKENS, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
        LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=KV_TOKENS, tensor_parallel_size=0)


def test_shard_rejects_sizes_that_do_not_divide_heads(tiny_qwen2_dir):
    from rrm_engine.loader import load
    model = load(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32).model
    with pytest.raises(ValueError, match="does not divide num_attention_heads=4"):
        shard_decoder(model, 0, 3)
