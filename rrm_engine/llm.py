"""The public entry point: LLM(model).generate(prompts, SamplingParams(...)).

Also the caller-driven interface used by judges and trainers: add_request / step / abort /
has_unfinished, and metrics() / reset_metrics() / invalidate_prefix_cache().

A driver (an AsyncLLM, async_engine/async_llm.py) can take over stepping this LLM's engine from its
background thread: it attaches with attach_driver() and leaves with detach_driver(). While one is
attached, generate() goes through it (submit + wait; its errors are the AsyncLLM's), abort() is forwarded to
it, add_request()/step() raise (the background loop owns stepping), and reset_metrics() /
invalidate_prefix_cache() run under its engine lock. Without one, everything runs in the caller's
thread as before, one call at a time: calls from several threads wait for each other instead of
corrupting the engine (for concurrent callers batched together, use AsyncLLM.of(llm)).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence as SequenceABC

import torch

from .core.engine import Engine, StepError
from .core.builder import build_engine, check_options
from .core.memory_plan import MemoryProbe
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)

class LLM:
    def __init__(self, model="embedded", device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                 kv_cache_tokens: int | None = None, enable_prefix_caching: bool = True, block_size: int = 16,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, attention_backend: str = "auto",
                 seed: int = 0, cuda_graphs: bool = False, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, memory_probe: MemoryProbe | None = None,
                 sampler_backend: str = "auto", weights: str | None = None,
                 kv_cache_dtype: torch.dtype | str | None = None):
        """cuda_graphs: run pure decode steps as CUDA graphs replayed at padded batch sizes (1, 2,
        4, ...); off by default until validated on a GPU. On CPU it runs the same padded path eagerly.
        tensor_parallel_size > 1: from a plain process, this LLM starts that many worker processes
        (one GPU each) and drives them (distributed/tp_workers.py): forked while this process has no
        CUDA context (a plain script needs no `if __name__ == "__main__":`), else spawned (then the
        script needs that guard, and says so if it lacks it); an AsyncLLM over it drives all ranks
        from its one loop (every Judge and the server use that). Inside an initialised
        torch.distributed group of that size (torchrun, tensor_parallel_launch) this process is one
        rank and every rank runs the same calls on the same inputs. Either way each rank reads only
        its shard of the checkpoint (see distributed/tensor_parallel.py, docs/SCALE_OUT.md).
        gpu_memory_utilization: the fraction of the device's total memory this engine may use
        (weights, activations, CUDA graphs and KV cache together; vLLM's meaning). On a GPU the KV
        cache gets what a profiling step and the graphs leave (memory_plan.py); the plan is printed
        at start-up and returned by memory_plan(). memory_probe: where device memory is read
        (default: the CUDA allocator on a GPU, none on CPU, where kv_cache_tokens defaults to 16384).
        sampler_backend: "auto" (Triton on CUDA, torch on CPU), "triton", "torch", or "csrc" (the
        CUDA C++ greedy kernel for all-greedy steps, Triton for the rest; CUDA only, JIT-built here).
        weights: the format of the linears' weights on CPU: "fp32" (the exact reference), "bf16",
        "q8_0", "q4_1" (GGUF blocks multiplied in place), or "auto" (the fastest that loses nothing of
        the checkpoint). None (default): "auto" when this LLM loads a Q8_0/Q4_1 .gguf itself (a name or
        a path, e.g. "embedded": the file's own blocks, nothing lost against the checkpoint, served
        faster than their fp32 dequantisation); otherwise the run dtype, and a LoadedModel passed in
        is served as it is (a trainer's decoder keeps its parameters). See rrm_engine/layers/weight_formats.py.
        Converting a LoadedModel changes its decoder in place (it can no longer be trained).
        kv_cache_dtype: the KV cache's dtype; None or "auto" keeps the run dtype. On CPU "bfloat16" or
        "float16" under an fp32 model halves the cache and the bytes attention reads per step (keys
        and values rounded as llama.cpp's default f16 cache does; lossy, so opt-in). On CUDA only the
        run dtype for now (the Triton kernels read the cache in the model's dtype)."""
        if tensor_parallel_size != 1 and weights not in (None, "auto"):
            raise ValueError(f"weights={weights!r} converts the weights in one process; tensor parallelism shards "
                             "the dense weights (leave weights unset)")
        if tensor_parallel_size != 1 and _spawns_workers(tensor_parallel_size):
            # refused here, before any worker starts (each worker's build_engine checks again)
            check_options(device, attention_backend, sampler_backend, weights, kv_cache_dtype)
            args = {k: v for k, v in locals().items() if k not in ("self", "model", "tensor_parallel_size", "__class__")}
            self._start_workers(model, tensor_parallel_size, args)
            return
        built = build_engine(model, device=device, dtype=dtype, kv_cache_tokens=kv_cache_tokens,
                             enable_prefix_caching=enable_prefix_caching, block_size=block_size,
                             max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                             attention_backend=attention_backend, seed=seed, cuda_graphs=cuda_graphs,
                             tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                             memory_probe=memory_probe, sampler_backend=sampler_backend, weights=weights,
                             kv_cache_dtype=kv_cache_dtype)
        self.loaded, self.tokenizer, self.engine = built.loaded, built.loaded.tokenizer, built.engine
        self.weights, self._memory_plan = built.weights, built.memory_plan
        self._init_driving()

    def _init_driving(self) -> None:
        self._pending: list[RequestOutput] = []  # outputs of caller-driven requests seen inside generate()
        self._driver = None  # what steps self.engine from another thread (an AsyncLLM), if any
        self._lock = threading.RLock()  # one caller-driven call at a time; a driver attaches under it
        # hold it to use self.tokenizer from several threads (HF tokenizers have raised "Already borrowed")
        self.tokenizer_lock = threading.Lock()

    def _start_workers(self, model, tensor_parallel_size: int, llm_kwargs: dict) -> None:
        """tensor_parallel_size ranks in worker processes (forked or spawned: tp_workers.start_method);
        this process keeps the tokenizer and sends every engine call to them (no weights here:
        self.loaded.model is None)."""
        from .distributed.tp_workers import WorkerEngine
        from .model.loader import LoadedModel

        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"tensor_parallel_size={tensor_parallel_size} from one process needs a model name or "
                            f"path (each worker loads its own shard), got {type(model).__name__}")
        self.engine = WorkerEngine(str(model), llm_kwargs, tensor_parallel_size)
        info = self.engine.info
        self.loaded = LoadedModel(model=None, tokenizer=info["tokenizer"], config=info["config"],
                                  eos_token_ids=info["eos_token_ids"], generation=info["generation"],
                                  name=info["name"], bytes_read=info["bytes_read"])
        self.tokenizer = info["tokenizer"]
        self._memory_plan = info["memory_plan"]
        self.weights = None  # the workers serve their dense shards
        self._init_driving()

    # ------------------------------------------------------------------------- generation
    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Text prompts are tokenised as they are (no chat
        template). Every prompt is validated before any is queued.

        prompts: a str (one prompt), a list of str, or a list of token-id lists. A flat list of ints
        (generate([42, 7])) is refused rather than guessed at: it reads as one token-id prompt or as
        a list of prompts gone wrong; write [[42, 7]] for one token-id prompt.
        use_tqdm: a progress bar over finished prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, list) and prompts and all(isinstance(p, int) for p in prompts):
            raise TypeError(f"generate() got a flat list of {len(prompts)} int(s); pass [[...]] (a list of token-id "
                            "lists) for token-id prompts, e.g. generate([[42, 7]]) for one prompt")
        if not isinstance(prompts, list):
            raise TypeError(f"prompts must be a str, a list of str or a list of token-id lists, got {type(prompts).__name__}")
        params = params if params is not None else SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        encoded = [self.encode(p) for p in prompts]
        for (ids, _), sp in zip(encoded, plist):
            self.engine.validate(ids, sp)  # every prompt before any is queued: the one validation
        with self._lock:
            driver = self._driver
            if driver is None:
                return self._generate_here(encoded, plist, use_tqdm)
        return driver.generate_encoded(encoded, plist)

    def _generate_here(self, encoded: list[tuple[list[int], str | None]], plist: list[SamplingParams],
                       use_tqdm: bool) -> list[RequestOutput]:
        """generate() driving the engine in this thread (self._lock held)."""
        ids_in_order: list[str] = []
        done: dict[str, RequestOutput] = {}
        bar = _GenerateProgress(len(encoded), self.engine) if use_tqdm else None
        try:
            for (ids, text), sp in zip(encoded, plist):
                ids_in_order.append(self.engine.add_request(ids, sp, prompt=text, validated=True))
            wanted = set(ids_in_order)
            while len(done) < len(wanted):
                try:
                    outs = self.engine.step()
                except StepError as e:  # rolled back; raise only if it failed one of ours
                    self._pending.extend(o for o in e.outputs if o.request_id not in wanted)
                    if any(o.request_id in wanted for o in e.outputs):
                        raise
                    continue
                for out in outs:
                    if out.request_id in wanted:
                        if out.finished:
                            done[out.request_id] = out
                            if bar is not None:
                                bar.finished(1)
                    else:
                        self._pending.append(out)
                if bar is not None:
                    bar.tick()
        except BaseException:
            # an error or Ctrl-C: nothing of this call stays queued for the next one
            for rid in ids_in_order:
                if rid not in done:
                    with contextlib.suppress(Exception):
                        self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[r] for r in ids_in_order]

    def encode(self, prompt: str | list[int]) -> tuple[list[int], str | None]:
        """(token ids, text or None) of a prompt as generate() takes it: a str is tokenised as it is
        (no chat template), a list of ids passes through. Thread-safe."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; this model has none: pass token ids")
            with self.tokenizer_lock:
                return list(self.tokenizer.encode(prompt)), prompt
        if isinstance(prompt, SequenceABC) and not isinstance(prompt, (bytes, bytearray)):
            return list(prompt), None
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    # -------------------------------------------------------------------- caller-driven API
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        ids, text = self.encode(prompt)
        with self._lock:
            self._refuse_if_driven("add_request")
            return self.engine.add_request(ids, params, request_id=request_id, prompt=text)

    def step(self) -> list[RequestOutput]:
        """Outputs of requests that had a sample finish in this step (finished=True when all n
        are done). A failed step raises StepError (see engine.py); it was rolled back, the
        requests it names have failed, the others go on: call step() again."""
        with self._lock:
            self._refuse_if_driven("step")
            outs = self.engine.step()
            pending, self._pending = self._pending, []
            return pending + outs

    def abort(self, request_id: str) -> RequestOutput | None:
        """Returns the request's final output; None if it is unknown or done. With an AsyncLLM
        attached the abort is forwarded to it and its waiter gets the output (returns None)."""
        with self._lock:
            driver = self._driver
            if driver is None:
                return self.engine.abort(request_id)
        driver.abort(request_id)
        return None

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished() or bool(self._pending)

    @property
    def tensor_parallel(self) -> bool:
        """True when this LLM's engine is tensor parallel: spawned worker ranks (no engine in this
        process) or this process is one rank (its decoder gathers the logits of every rank)."""
        engine = self.engine
        return not isinstance(engine, Engine) or getattr(engine.model, "gather_logits", None) is not None

    def metrics(self) -> dict:
        return self.engine.metrics()

    def reset_metrics(self) -> None:
        with self._engine_lock():
            self.engine.reset_metrics()

    def memory_plan(self) -> dict:
        """How this engine (this rank) split device memory at start-up: MemoryPlan.as_dict()."""
        return self._memory_plan.as_dict()

    def invalidate_prefix_cache(self) -> None:
        with self._engine_lock():
            self.engine.invalidate_prefix_cache()

    # ------------------------------------------------- when a driver (AsyncLLM) steps the engine
    @property
    def driver(self):
        """The driver stepping this LLM's engine from its own thread (an AsyncLLM), or None."""
        return self._driver

    def attach_driver(self, driver) -> None:
        """Hand the stepping of this engine to `driver`, which must offer generate_encoded(encoded,
        params), abort(request_id) and engine_lock (held around everything it does to the engine).
        Waits for a caller-driven call in progress; refuses a second driver and unfinished
        caller-driven requests."""
        with self._lock:
            if self._driver is not None:
                raise ValueError("this LLM is already driven by an AsyncLLM: share it with AsyncLLM.of(llm)")
            if self.has_unfinished():
                raise ValueError("this LLM has unfinished caller-driven requests: finish or abort them before "
                                 "an AsyncLLM takes over its engine")
            self._driver = driver

    def detach_driver(self, driver) -> None:
        """The driver leaves (shut down); the LLM steps its engine itself again."""
        with self._lock:
            if self._driver is driver:
                self._driver = None

    def driver_or_attach(self, make):
        """The attached driver, or make() (which attaches itself) when there is none, atomically."""
        with self._lock:
            return self._driver if self._driver is not None else make()

    def _refuse_if_driven(self, what: str) -> None:
        if self._driver is not None:
            raise RuntimeError(f"LLM.{what}() while an AsyncLLM drives this engine: its background loop does the "
                               "stepping; submit through the AsyncLLM (submit/generate/stream) or call generate()")

    @contextlib.contextmanager
    def _engine_lock(self):
        """Exclusive use of the engine: the AsyncLLM's engine lock (its loop steps under it), or
        without one this LLM's own lock."""
        with self._lock:
            driver = self._driver
            if driver is None:
                yield
                return
        with driver.engine_lock:
            yield


def _spawns_workers(tensor_parallel_size: int) -> bool:
    """True when this process is not a rank of a process group: LLM then spawns its own ranks.
    A torchrun rank that has not joined its group yet gets the error that says how."""
    import torch.distributed as dist

    from .distributed.tensor_parallel import check_tensor_parallel_size, launched_by_torchrun
    check_tensor_parallel_size(tensor_parallel_size)
    return not (dist.is_available() and dist.is_initialized()) and not launched_by_torchrun()


class _GenerateProgress:
    """tqdm over finished prompts, with the tokens generated so far: a single long prompt would
    otherwise sit at 0/1 until it ends. The postfix is refreshed at most twice a second."""

    def __init__(self, total: int, engine: Engine):
        from tqdm.auto import tqdm

        self.engine = engine
        self.start = engine.metrics().get("generated_tokens", 0)
        self.bar = tqdm(total=total, desc="generate", unit="prompt")
        self.last = 0.0

    def finished(self, n: int) -> None:
        self.bar.update(n)

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last >= 0.5:
            self.last = now
            self.bar.set_postfix(tokens=self.engine.metrics().get("generated_tokens", 0) - self.start)

    def close(self) -> None:
        self.last = 0.0
        self.tick()
        self.bar.close()
