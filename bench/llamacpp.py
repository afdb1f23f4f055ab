"""System (d): llama.cpp through llama-cpp-python, driven the way a llama.cpp user runs k votes.

Per comparison prompt: decode the prompt once (in n_batch chunks) on one sequence, fork it to the
k vote sequences with llama_memory_seq_cp (llama.cpp's prefix sharing), sample each vote's first
token from the prompt's last logits, then decode every vote of every replayed comparison in one
llama_batch per step, each row sampled by its own llama.cpp sampler chain (temperature + dist,
top-p 1, no top-k: as the other systems). Exactly gen_len tokens per vote: EOS is not checked.
n_threads (and n_threads_batch) = the thread count of the other systems.

Precisions: the GGUF as shipped (Q4_1 for the embedded model), and F32 / F16 / Q8_0 converted from
it by llama.cpp's own llama_model_quantize (allow_requantize), cached next to the engine's GGUF
conversions. Optional: pip install '.[bench-llamacpp]' (llama-cpp-python, built from source).
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .baselines import SystemResult

PRECISIONS = ("q4_1", "f16", "f32", "q8_0")
# llama_ftype values (llama.h): what llama_model_quantize writes
_FTYPES = {"f32": 0, "f16": 1, "q4_1": 3, "q8_0": 7}
SKIP_LINE = ("system (d) llama.cpp: skipped, llama-cpp-python is not installed "
             "(pip install '.[bench-llamacpp]' builds it from source, several minutes)")


def unavailable_reason() -> str | None:
    """None when llama_cpp imports, else the one line the benchmark prints instead of (d)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # ImportError, or a broken build (OSError loading libllama)
        return SKIP_LINE
    return None


def gguf_file(source: Path, precision: str, cache: Path) -> Path:
    """source itself when it already is that precision, else its llama.cpp conversion (cached)."""
    import llama_cpp

    if precision not in PRECISIONS:
        raise ValueError(f"llama.cpp precision must be one of {PRECISIONS}, got {precision!r}")
    if source.stem.lower().endswith(precision):
        return source
    out = cache / f"{source.stem}.{precision}.gguf"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = _FTYPES[precision], True, 1
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        raise RuntimeError(f"llama_model_quantize {source.name} -> {precision} failed (rc {rc})")
    tmp.rename(out)
    return out


@dataclass
class LlamaCpp:
    """One loaded llama.cpp model (load stays out of the timing); a context per run, sized to it."""
    path: Path
    precision: str
    threads: int
    kv_unified: bool = False
    flash_attn: int = -1  # llama_flash_attn_type: -1 auto (llama.cpp's default), 0 off, 1 on
    model: Any = None

    def __post_init__(self) -> None:
        import llama_cpp

        _silence_logs()
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")

    def new_context(self, n_seq_max: int, tokens_per_seq: int) -> Any:
        import llama_cpp

        cp = llama_cpp.llama_context_default_params()
        # a split cache holds n_ctx / n_seq_max cells per sequence; a unified one shares all n_ctx
        cp.n_ctx = n_seq_max * (-(-tokens_per_seq // 256) * 256)
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = n_seq_max
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.kv_unified = self.kv_unified
        cp.flash_attn_type = self.flash_attn
        cp.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx {cp.n_ctx}, n_seq_max {n_seq_max})")
        return ctx

    def close(self) -> None:
        import llama_cpp

        if self.model:
            llama_cpp.llama_model_free(self.model)
        self.model = None

    @property
    def label(self) -> str:
        return f"d: llama.cpp {self.precision.upper()}"


_QUIET: Any = None  # the ctypes log callback must outlive every llama.cpp call: kept here


def _silence_logs() -> None:
    """llama.cpp's load/context logs would bury the report."""
    global _QUIET
    import llama_cpp

    if _QUIET is None:
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_QUIET, None)


def _sampler(temperature: float, seed: int) -> Any:
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def _fill(batch: Any, rows: list[tuple[int, int, int, bool]]) -> None:
    """rows: (token, position, sequence, wants logits)."""
    batch.n_tokens = len(rows)
    for i, (tok, pos, seq, out) in enumerate(rows):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = out


def run_llamacpp(lc: LlamaCpp, prompts: list[tuple[list[int], int]], gen_len: int, temperature: float,
                 seed: int, kv_bytes_per_token: int = 0) -> SystemResult:
    """Every comparison: prompt decoded once, forked to its n votes; all votes decoded together.
    kv_bytes_per_token (at llama.cpp's f16 cache) sizes the analytic KV peak in the result."""
    import llama_cpp

    total_seqs = sum(n for _, n in prompts)
    ctx = lc.new_context(total_seqs, max(len(p) for p, _ in prompts) + gen_len + 1)
    chunk, batch, samplers = 512, None, []
    try:
        mem = llama_cpp.llama_get_memory(ctx)
        batch = llama_cpp.llama_batch_init(max(chunk, total_seqs), 0, 1)
        t_start = time.perf_counter()
        seqs: list[tuple[int, int]] = []  # (sequence id, next position) per vote
        first: list[int] = []
        for c, (ids, n) in enumerate(prompts):
            base = len(seqs)
            for s in range(0, len(ids), chunk):  # the prompt once, on the comparison's first sequence
                part = ids[s:s + chunk]
                _fill(batch, [(t, s + i, base, s + i == len(ids) - 1) for i, t in enumerate(part)])
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise RuntimeError(f"llama_decode failed on prompt {c}")
            last = (len(ids) - 1) % chunk
            for v in range(n):
                if v:
                    llama_cpp.llama_memory_seq_cp(mem, base, base + v, -1, -1)
                samplers.append(_sampler(temperature, seed + 1000 * c + v))
                first.append(llama_cpp.llama_sampler_sample(samplers[-1], ctx, last))
                seqs.append((base + v, len(ids)))
        tokens = first
        for step in range(1, gen_len):  # the first token came from the prompt's logits
            _fill(batch, [(tok, pos + step - 1, seq, True) for tok, (seq, pos) in zip(tokens, seqs)])
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed at step {step}")
            tokens = [llama_cpp.llama_sampler_sample(smp, ctx, i) for i, smp in enumerate(samplers)]
        seconds = time.perf_counter() - t_start
    finally:
        for smp in samplers:
            llama_cpp.llama_sampler_free(smp)
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    prompt_tokens = sum(len(p) for p, _ in prompts)
    # a split cache copies the prompt into each vote's stream; a unified one keeps it once
    cells = total_seqs * gen_len + (prompt_tokens if lc.kv_unified else sum(len(p) * n for p, n in prompts))
    return SystemResult(lc.label, seconds, len(prompts), total_seqs * gen_len, prompt_tokens, prompt_tokens,
                        cells * kv_bytes_per_token,
                        [seconds] * len(prompts),
                        {"precision": lc.precision, "gguf": str(lc.path), "threads": lc.threads,
                         "kv_unified": lc.kv_unified, "flash_attn": lc.flash_attn,
                         "kv_peak_note": "analytic: cells in use x f16 K+V bytes (llama.cpp allocates n_ctx up front)"})
