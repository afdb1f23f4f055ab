"""Greedy generation with tensor parallelism: one process per rank, launched by torchrun.

    torchrun --nproc-per-node 2 docs/tp_generate.py MODEL [--max-tokens 16]

Every rank runs this same script on the same prompts (SPMD); rank 0 prints. On GPUs each rank takes
cuda:LOCAL_RANK with NCCL; without GPUs it runs on CPU with gloo.
"""
from __future__ import annotations

import argparse

import torch

import rrm_engine as rrm
from rrm_engine.distributed import init_tensor_parallel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    rank, world = init_tensor_parallel()
    dtype = None if torch.cuda.is_available() else torch.float32
    llm = rrm.LLM(args.model, dtype=dtype, tensor_parallel_size=world, kv_cache_tokens=4096)
    prompts = [[1, 2, 3, 4, 5], [10, 11, 12]] if llm.tokenizer is None else ["The capital of France is", "1, 2, 3,"]
    outs = llm.generate(prompts, rrm.SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    if rank == 0:
        for o in outs:
            print(o.outputs[0].token_ids, repr(o.outputs[0].text))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
