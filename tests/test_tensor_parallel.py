"""Tensor parallelism through the engine: two gloo ranks on CPU give the logits and tokens of one process.

Two ways to run the ranks, as users do: tensor_parallel_launch (the Python counterpart of torchrun:
every rank runs the test's function) and LLM(path, tensor_parallel_size=2) called from this one
process, which spawns its own two workers. One launch runs every in-group check on both ranks,
because starting the processes (import torch + transformers) is most of the cost. The reference
runs in the test process on the same tiny Qwen2 (fp32). Logits are compared at 1e-5: fp32, the only
difference is the order of the row-parallel partial sums (|logits| = O(1)); a wrong shard (a head,
bias or vocab slice misplaced) moves them by O(0.1) or more. Each rank reads only its slices of the
checkpoint: checked by the bytes the loader reads and against a full checkpoint sharded in memory.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rrm_engine import LLM, SamplingParams
from rrm_engine.distributed import shard_decoder, tensor_parallel_launch
from rrm_engine.distributed.tensor_parallel import RankShard
from rrm_engine.model.loader import load_hf
from rrm_engine.core.memory_plan import GiB

ATOL = 1e-5
MAX_TOKENS = 20
KV_TOKENS = 1024
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)


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
    outs = llm.generate(_prompts(), GREEDY)
    model.compute_logits = full
    ids, pos = _dense_batch()
    with torch.no_grad():
        dense = model.compute_logits(model(ids, pos))
    return {"steps": steps, "dense": dense, "tokens": [o.outputs[0].token_ids for o in outs],
            "logprobs": [o.outputs[0].logprobs for o in outs], "bytes_read": llm.loaded.bytes_read,
            "kv_heads": llm.engine.cache.k.shape[3], "cached": llm.metrics()["cached_prefix_tokens"]}


class RankProbe:
    """A fake device with less free memory on rank 1 (module level: the spawned ranks unpickle it)."""

    def __init__(self, free: int):
        self._free = free

    def total(self) -> int:
        return GiB

    def free(self) -> int:
        return self._free

    def allocated(self) -> int:
        return 0

    def peak_allocated(self) -> int:
        return 1 << 20

    def reset_peak(self) -> None:
        pass


def tp_worker(model_dir: str, world: int) -> dict:
    """Runs on every rank (module level: spawn pickles it by name). Checks that the ranks agree on
    every token (SPMD: they must sample the same), then returns this rank's results."""
    res = _run(model_dir, world)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, res["tokens"])
    res["ranks_agree"] = all(g == res["tokens"] for g in gathered)
    # each rank sizes its cache from its own device; all must take the smallest, or their schedules part
    rank = dist.get_rank()
    planned = LLM(model_dir, device="cpu", dtype=torch.float32, tensor_parallel_size=world,
                  memory_probe=RankProbe((64 if rank == 0 else 32) << 20), max_num_batched_tokens=64, max_num_seqs=4)
    res["planned_blocks"] = planned.engine.pool.num_blocks
    del planned
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


def test_llm_from_one_process_spawns_its_ranks(tiny_qwen2_dir, single, two_ranks):
    """LLM(path, tensor_parallel_size=2) from this plain process (its ranks forked: no CUDA here; a
    plain script and spawned ranks: test_tp_plain_script.py): the same greedy tokens as one
    process and as the launched ranks, log-probs of the top tokens within 1e-5, bad requests refused
    with the engine's error while the workers go on, and only rank shards read."""
    llm = LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=KV_TOKENS,
              tensor_parallel_size=2)
    try:
        assert llm.loaded.model is None and llm.loaded.config.vocab_size == 49152  # no weights in this process
        outs = llm.generate(_prompts(), GREEDY)
        tokens = [o.outputs[0].token_ids for o in outs]
        assert tokens == single["tokens"] == two_ranks["tokens"]
        for got, want in zip([o.outputs[0].logprobs for o in outs], single["logprobs"]):
            for g, w in zip(got, want):
                assert g.keys() == w.keys()
                assert max(abs(g[t] - w[t]) for t in g) < ATOL
        assert llm.metrics()["cached_prefix_tokens"] == single["cached"]
        assert llm.memory_plan()["kv_cache_tokens"] == KV_TOKENS
        assert llm.loaded.bytes_read == two_ranks["bytes_read"]
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate([[10 ** 7]], GREEDY)
        assert llm.generate([_prompts()[3]], GREEDY)[0].outputs[0].token_ids == single["tokens"][3]
        with pytest.raises(AttributeError, match="live in the spawned workers"):
            llm.engine.cache
    finally:
        llm.engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1, 2]], GREEDY)


def test_ranks_agree_on_the_smallest_planned_cache(two_ranks):
    # rank 1's fake device has 32 MiB free: 32 MiB - 1 MiB of activations in blocks of 16 tokens x 256 B
    # (K and V, 2 layers, the rank's 1 KV head of 16 fp32), minus the scratch block; rank 0 has 64 MiB free
    assert two_ranks["planned_blocks"] == (31 << 20) // (16 * 256) - 1


def test_tensor_parallel_size_must_be_positive(tiny_qwen2_dir):
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
        LLM(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32, kv_cache_tokens=KV_TOKENS, tensor_parallel_size=0)


def test_rank_shard_loading_reads_only_the_ranks_slices(tiny_qwen2_dir, single, two_ranks):
    full = load_hf(tiny_qwen2_dir)
    norms = sum(p.numel() * 4 for n, p in full.model.named_parameters() if "norm" in n)  # kept whole by every rank
    assert full.bytes_read == single["bytes_read"]
    for rank in range(2):
        part = load_hf(tiny_qwen2_dir, shard=RankShard(rank, 2))
        assert part.bytes_read == (full.bytes_read - norms) // 2 + norms
        want = dict(shard_decoder(load_hf(tiny_qwen2_dir).model, rank, 2).named_parameters())
        got = dict(part.model.named_parameters())
        assert got.keys() == want.keys()
        for name, p in got.items():
            assert torch.equal(p, want[name]), name
    assert two_ranks["bytes_read"] == (full.bytes_read - norms) // 2 + norms  # LLM in a process group too


def test_shard_rejects_sizes_that_do_not_divide_heads(tiny_qwen2_dir):
    from rrm_engine.model.loader import load
    model = load(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32).model
    with pytest.raises(ValueError, match="does not divide num_attention_heads=4"):
        shard_decoder(model, 0, 3)
