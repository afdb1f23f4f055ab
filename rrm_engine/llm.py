"""The public entry point: LLM(model).generate(prompts, SamplingParams(...)).

Also the caller-driven interface used by judges and trainers: add_request / step / abort /
has_unfinished, and metrics() / reset_metrics() / invalidate_prefix_cache().
"""
from __future__ import annotations

import os
from collections.abc import Sequence as SequenceABC

import torch

from .engine import Engine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

_CPU_DEFAULT_KV_TOKENS = 16384  # 0.75 GB of fp32 KV for SmolLM2-135M
_GPU_KV_FRACTION = 0.85  # of the memory free after loading the weights


class LLM:
    def __init__(self, model="embedded", device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 kv_cache_tokens: int | None = None, enable_prefix_caching: bool = True, block_size: int = 16,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, attention_backend: str = "auto",
                 seed: int = 0, cuda_graphs: bool = False, tensor_parallel_size: int = 1, sampler_backend: str = "auto"):
        """cuda_graphs: run pure decode steps as CUDA graphs replayed at padded batch sizes (1, 2,
        4, ...); off by default until validated on a GPU. On CPU it runs the same padded path eagerly.
        tensor_parallel_size > 1: this process is one rank of an initialised torch.distributed group of
        that size (torchrun or rrm_engine.distributed.tensor_parallel_launch); every rank runs the same
        calls on the same inputs (see rrm_engine/distributed/tensor_parallel.py, docs/SCALE_OUT.md).
        sampler_backend: "auto" (Triton on CUDA, torch on CPU), "triton", "torch", or "csrc" (the
        CUDA C++ greedy kernel for all-greedy steps, Triton for the rest; CUDA only, JIT-built here)."""
        from .loader import LoadedModel, load

        if isinstance(model, (str, os.PathLike)):
            loaded = load(model, device=device, dtype=dtype)
        elif isinstance(model, LoadedModel) or hasattr(model, "model") and hasattr(model, "eos_token_ids"):
            loaded = model
        else:
            raise TypeError(f"model must be a name, a path or a LoadedModel, got {type(model).__name__}")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        decoder = loaded.model
        decoder.eval()
        if tensor_parallel_size != 1:  # shard first: the KV cache below is sized from the shard's model.cfg
            from .distributed.tensor_parallel import shard_for_engine
            shard_for_engine(decoder, tensor_parallel_size)
        _use_backend(decoder, attention_backend)
        if kv_cache_tokens is None:
            kv_cache_tokens = _default_kv_tokens(decoder, block_size)
            if tensor_parallel_size != 1:  # ranks must schedule alike: size every cache by the fullest GPU
                from .distributed.tensor_parallel import agree_min
                kv_cache_tokens = agree_min(kv_cache_tokens, next(decoder.parameters()).device)
        if not isinstance(kv_cache_tokens, int) or kv_cache_tokens < block_size:
            raise ValueError(f"kv_cache_tokens must be an integer >= block_size ({block_size}), got {kv_cache_tokens!r}")
        self.engine = Engine(decoder, loaded.tokenizer, tuple(loaded.eos_token_ids),
                             num_blocks=kv_cache_tokens // block_size, block_size=block_size,
                             enable_prefix_caching=enable_prefix_caching,
                             max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, seed=seed,
                             cuda_graphs=cuda_graphs, sampler_backend=sampler_backend)
        self._pending: list[RequestOutput] = []  # outputs of caller-driven requests seen inside generate()

    # ------------------------------------------------------------------------- generation
    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Text prompts are tokenised as they are (no chat
        template). Every prompt is validated before any is queued."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list):
            raise TypeError(f"prompts must be a str, a list of str or a list of token-id lists, got {type(prompts).__name__}")
        params = params if params is not None else SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        encoded = [self._encode(p) for p in prompts]
        for (ids, _), sp in zip(encoded, plist):
            self.engine.validate(ids, sp)
        ids_in_order = [self.engine.add_request(ids, sp, prompt=text) for (ids, text), sp in zip(encoded, plist)]
        wanted = set(ids_in_order)
        done: dict[str, RequestOutput] = {}
        bar = _progress(len(prompts)) if use_tqdm else None
        while len(done) < len(wanted):
            for out in self.engine.step():
                if out.request_id in wanted:
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                else:
                    self._pending.append(out)
        if bar is not None:
            bar.close()
        return [done[r] for r in ids_in_order]

    def _encode(self, prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; this model has none: pass token ids")
            return list(self.tokenizer.encode(prompt)), prompt
        if isinstance(prompt, SequenceABC) and not isinstance(prompt, (bytes, bytearray)):
            return list(prompt), None
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    # -------------------------------------------------------------------- caller-driven API
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        ids, text = self._encode(prompt)
        return self.engine.add_request(ids, params, request_id=request_id, prompt=text)

    def step(self) -> list[RequestOutput]:
        """Outputs of requests that had a sample finish in this step (finished=True when all n
        are done)."""
        out, self._pending = self._pending, []
        return out + self.engine.step()

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.engine.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished() or bool(self._pending)

    def metrics(self) -> dict:
        return self.engine.metrics()

    def reset_metrics(self) -> None:
        self.engine.reset_metrics()

    def invalidate_prefix_cache(self) -> None:
        self.engine.invalidate_prefix_cache()


def _use_backend(decoder, name: str) -> None:
    """Torch attention and norms, or the Triton kernels for both (attention with rotary fused into
    the KV store, residual add fused into RMSNorm)."""
    from .attention import TorchAttention

    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {name!r}")
    device = next(decoder.parameters()).device
    decoder.backend, fused = TorchAttention(), False
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        try:
            from .triton_backend import TritonAttention
            decoder.backend, fused = TritonAttention(), True
        except ImportError as e:
            if name == "triton":
                raise ValueError(f"attention_backend='triton' is not available: {e}") from e
    decoder.use_fused_norms(fused)


def _default_kv_tokens(model, block_size: int) -> int:
    p = next(model.parameters())
    cfg = model.cfg
    if p.device.type != "cuda":
        return _CPU_DEFAULT_KV_TOKENS
    free, _ = torch.cuda.mem_get_info(p.device)
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * p.element_size()
    return max(block_size, int(free * _GPU_KV_FRACTION) // per_token)


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="generate")
