"""End-to-end judging throughput: `python -m bench.throughput [options]` (run from the repo root).

Workload: Q queries x N candidates ranked by knockout and/or ELO with k votes per match, every
vote generating exactly --gen-len tokens (ignore_eos) so that all systems do the same work.
Three systems in one process, each warmed up once on a small run before it is timed:
  (a) transformers generate(num_return_sequences=k), prompts batched with left padding;
  (b) rrm_engine without sharing: prefix caching off, each vote its own n=1 request;
  (c) rrm_engine with everything on, driven by the judge: Judge.rank_batch (strict, no order swap,
      so that each comparison is one request with n=k), its linears in --weights (default auto:
      the checkpoint's own GGUF blocks for the embedded model, see rrm_engine/layers/weight_formats.py);
  (d) llama.cpp through llama-cpp-python when it is installed (else one line says it is skipped):
      each prompt decoded once and forked to k sequences with seq_cp, all votes decoded in one
      llama_batch per step, same thread count (llamacpp.py); once per --llamacpp precision, the
      fastest being the one (c)/(d) is reported against.
Knockout's later rounds depend on verdicts, so (c) runs first through the judge and records the
exact prompts it judged; (a) and (b) then replay those prompts, all known up front (which only
helps them: they never wait for a round to end). Reported per system: comparisons/s, generated
tokens/s, prefill tokens computed vs requested (one prompt per comparison), peak KV memory, p50/p99
seconds per comparison (submission to last vote), and the ratios (c)/(a), (c)/(b), (c)/(d).
Real thinking lengths: --gen-len 512 (the judging target's configuration, see bench/RESULTS.md).

A roofline line for the decode steps of (c) uses copy bandwidth and matmul rate measured in the
same run (roofline.py). --profile DIR traces an extra run of (c) (profiling.py). --json FILE writes
everything. --sweep votes|prompt-len|gen-len V1,V2,... repeats the comparison; --plot FILE.png
draws tokens/s against the swept value (needs matplotlib, an optional extra).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rrm_engine  # noqa: F401  first: it sets OMP_WAIT_POLICY before torch loads OpenMP (see rrm_engine/__init__)
import torch

from .baselines import (Shape, SystemResult, embedded_gguf, load_hf_model, random_qwen2_7b, run_engine_unshared, run_hf,
                        sync)
from .llamacpp import PRECISIONS as LLAMACPP_PRECISIONS
from .llamacpp import run_llamacpp
from rrm_engine.core.profiling import phase

from .profiling import profile_run
from .roofline import copy_bandwidth, decode_roofline, matmul_rate, quant_linear_rate
from .workload import RecordingLLM, Workload, make_workload

SYSTEMS = ("a", "b", "c", "d")
SWEEPABLE = {"votes": "votes", "prompt-len": "prompt_len", "gen-len": "gen_len"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Options:
    model: str = "embedded"
    device: str | None = None
    dtype: str | None = None
    votes: int = 8
    candidates: int = 4
    queries: int = 2
    prompt_len: int = 500
    gen_len: int = 32
    method: str = "knockout"
    shape: str | None = None
    layers: int | None = None
    systems: tuple[str, ...] = SYSTEMS
    hf_batch: int = 4
    kv_tokens: int | None = None
    temperature: float = 0.6
    seed: int = 0
    profile: str | None = None
    json: str | None = None
    sweep: str | None = None
    sweep_values: tuple[int, ...] = ()
    plot: str | None = None
    quiet: bool = False
    threads: int | None = None
    profile_steps: int = 10
    pandalm: Path | None = None  # None: workload.default_pandalm()
    cuda_graphs: bool = False
    weights: str = "auto"
    llamacpp: tuple[str, ...] = ("q4_1", "f16", "f32")
    llamacpp_flash_attn: str = "auto"
    llamacpp_kv_unified: bool = False
    kv_cache_dtype: str | None = None  # the engine's KV cache dtype, None: the run dtype


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded' (default), an HF model dir or a .gguf file")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--votes", type=int, default=8, help="k votes per comparison")
    p.add_argument("--pandalm", type=Path, default=None, help="PandaLM test set for the texts (default: $RRM_PANDALM, "
                   "else ../shared/data/pandalm_testset_v1.json; synthetic text, said so, when absent)")
    p.add_argument("--candidates", type=int, default=4, help="N candidates per query")
    p.add_argument("--queries", type=int, default=2, help="Q queries")
    p.add_argument("--prompt-len", type=int, default=500, help="target tokens of one comparison prompt")
    p.add_argument("--gen-len", type=int, default=32, help="tokens generated by every vote")
    p.add_argument("--method", default="knockout", choices=("knockout", "elo", "both"))
    p.add_argument("--shape", default=None, choices=("qwen2-7b",),
                   help="random weights with RRM-7B's shapes instead of --model")
    p.add_argument("--layers", type=int, default=None, help="with --shape: keep only this many layers")
    p.add_argument("--systems", default="a,b,c,d",
                   help="comma list of a (transformers), b (no sharing), c (all on), d (llama.cpp, when installed)")
    p.add_argument("--weights", default="auto", choices=("fp32", "bf16", "q8_0", "q4_1", "auto"),
                   help="format of the engine's linear weights for (b) and (c) (LLM(weights=...)); auto: the "
                        "checkpoint's own (Q4_1 blocks for the embedded model)")
    p.add_argument("--kv-cache-dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="KV cache dtype of the engine's systems (b) and (c) (LLM(kv_cache_dtype=...); CPU only when "
                        "it differs from --dtype); default: the run dtype")
    p.add_argument("--llamacpp", default="q4_1,f16,f32",
                   help=f"(d) precisions, comma list of {', '.join(LLAMACPP_PRECISIONS)} (q4_1: the GGUF as "
                        "shipped; others converted by llama.cpp's llama_model_quantize); the fastest is (d)")
    p.add_argument("--llamacpp-flash-attn", default="auto", choices=("auto", "on", "off"),
                   help="(d) flash attention (llama.cpp's default: auto)")
    p.add_argument("--llamacpp-kv-unified", action="store_true",
                   help="(d) one KV buffer shared by all sequences (llama.cpp default: one per sequence)")
    p.add_argument("--hf-batch", type=int, default=4, help="comparison prompts per transformers generate call")
    p.add_argument("--kv-tokens", type=int, default=None, help="engine KV cache size in tokens (engine default)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", metavar="DIR", default=None, help="trace an extra run of (c) into DIR")
    p.add_argument("--profile-steps", type=int, default=10,
                   help="engine steps recorded by --profile (after one warm-up step): the first prefill + decode")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON")
    p.add_argument("--sweep", nargs=2, metavar=("PARAM", "VALUES"), default=None,
                   help=f"PARAM in {sorted(SWEEPABLE)}, VALUES comma-separated integers")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="with --sweep: tokens/s per system (matplotlib)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="engine systems decode through CUDA graphs (captured at start-up; eager off CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); on a CPU shared with other jobs use 1: "
                        "OpenMP threads that wait for a descheduled sibling make small matmuls 10-50x slower")
    a = p.parse_args(argv)
    systems = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        p.error(f"--systems takes a comma list of {', '.join(SYSTEMS)}; got {a.systems!r}")
    for name in ("votes", "candidates", "queries", "prompt_len", "gen_len", "hf_batch", "profile_steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.candidates < 2:
        p.error(f"--candidates must be >= 2, got {a.candidates}")
    if a.layers is not None and (a.shape is None or a.layers < 1):
        p.error("--layers needs --shape and must be >= 1")
    sweep, values = None, ()
    if a.sweep is not None:
        sweep = a.sweep[0]
        if sweep not in SWEEPABLE:
            p.error(f"--sweep PARAM must be one of {sorted(SWEEPABLE)}, got {sweep!r}")
        try:
            values = tuple(int(v) for v in a.sweep[1].split(","))
        except ValueError:
            p.error(f"--sweep VALUES must be comma-separated integers, got {a.sweep[1]!r}")
        if not values or min(values) < 1:
            p.error("--sweep VALUES must be integers >= 1")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.plot is not None and sweep is None:
        p.error("--plot needs --sweep")
    precisions = tuple(x.strip() for x in a.llamacpp.split(",") if x.strip())
    if not precisions or any(x not in LLAMACPP_PRECISIONS for x in precisions):
        p.error(f"--llamacpp takes a comma list of {', '.join(LLAMACPP_PRECISIONS)}; got {a.llamacpp!r}")
    return Options(a.model, a.device, a.dtype, a.votes, a.candidates, a.queries, a.prompt_len, a.gen_len, a.method,
                   a.shape, a.layers, systems, a.hf_batch, a.kv_tokens, a.temperature, a.seed, a.profile, a.json,
                   sweep, values, a.plot, a.quiet, a.threads, a.profile_steps, a.pandalm, a.cuda_graphs, a.weights,
                   precisions, a.llamacpp_flash_attn, a.llamacpp_kv_unified, a.kv_cache_dtype)


# ------------------------------------------------------------------------------ the systems
@dataclass
class Setup:
    opts: Options
    device: torch.device
    dtype: torch.dtype
    shape: Shape
    model_note: str
    llm_c: Any  # rrm_engine.LLM, everything on
    llm_b: Any | None  # rrm_engine.LLM, prefix caching off (same weights)
    hf: Any | None  # transformers model (same weights)
    tokenizer: Any
    block_size: int = 16
    ceilings: tuple[float, float] = (0.0, 0.0)  # measured copy B/s, mm FLOP/s
    llamacpp: list[Any] = field(default_factory=list)  # (d): one llamacpp.LlamaCpp per precision
    llamacpp_note: str | None = None  # why (d) is not run, when it is not

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def kv_elem(self) -> int:  # the engine's KV cache element (--kv-cache-dtype, else the run dtype)
        kv = self.opts.kv_cache_dtype
        return torch.empty((), dtype=getattr(torch, kv)).element_size() if kv else self.elem

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.shape.kv_bytes_per_token(self.kv_elem)


def _judge_cls() -> Any:
    return rrm_engine.Judge


def build(opts: Options, log=print) -> Setup:
    import rrm_engine as rrm

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[opts.dtype] if opts.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kw = dict(device=device, dtype=dtype) if opts.shape is None else {}
    engine_kw = dict(block_size=16, seed=opts.seed, cuda_graphs=opts.cuda_graphs,
                     kv_cache_tokens=opts.kv_tokens or _kv_tokens_needed(opts), kv_cache_dtype=opts.kv_cache_dtype)
    t = time.perf_counter()
    hf = None
    if opts.shape == "qwen2-7b":
        from transformers import AutoTokenizer

        from .baselines import embedded_gguf
        g = embedded_gguf()
        tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
        hf, loaded = random_qwen2_7b(opts.layers, tok, device, dtype, opts.seed)
        llm_c = rrm.LLM(loaded, weights=opts.weights if device.type == "cpu" else None, **engine_kw)
        note = (f"RANDOM WEIGHTS with RRM-7B (Qwen2-7B) shapes, {hf.config.num_hidden_layers} of 28 layers; "
                "tokenizer: SmolLM2's (ids only)")
    else:
        llm_c = rrm.LLM(opts.model, weights=opts.weights, **kw, **engine_kw)
        tok = llm_c.tokenizer
        note = f"model {opts.model}, engine weights {llm_c.weights} (--weights {opts.weights})"
        if "a" in opts.systems:
            hf = load_hf_model(opts.model, device, dtype)
    if tok is None:
        raise ValueError("the benchmark needs a tokenizer with a chat template (the judge builds the prompts)")
    llm_b = rrm.LLM(llm_c.loaded, enable_prefix_caching=False, **engine_kw) if "b" in opts.systems else None
    if "a" not in opts.systems:
        hf = None
    shape = Shape.from_hf_config(hf.config) if hf is not None else _shape_of(llm_c)
    log(f"[setup] {note}; device {device}, {dtype}; loaded in {time.perf_counter() - t:.1f}s")
    setup = Setup(opts, device, dtype, shape, note, llm_c, llm_b, hf, tok)
    if "d" in opts.systems:
        setup.llamacpp, setup.llamacpp_note = _load_llamacpp(opts, device)
        log(setup.llamacpp_note or f"[setup] (d) llama.cpp: {', '.join(str(lc.path.name) for lc in setup.llamacpp)}")
    return setup


def _kv_tokens_needed(opts: Options) -> int:
    """Engine KV cache big enough that no vote is preempted: every comparison of a run in flight
    at once (prompt + votes x generated tokens, whole blocks), and never below the engine's default."""
    gen = max((opts.sweep_values if opts.sweep == "gen-len" else ()) + (opts.gen_len,))
    votes = max((opts.sweep_values if opts.sweep == "votes" else ()) + (opts.votes,))
    prompt = max((opts.sweep_values if opts.sweep == "prompt-len" else ()) + (opts.prompt_len,))
    # knockout: a round's matches run together (the first round is the widest); ELO: every pair at once
    knockout, elo = -(-opts.candidates // 2), opts.candidates * (opts.candidates - 1) // 2
    per_query = knockout if opts.method == "knockout" else elo
    per_cmp = prompt + 64 + votes * (gen + 32)
    return max(16384, opts.queries * per_query * per_cmp)


def _load_llamacpp(opts: Options, device: torch.device) -> tuple[list[Any], str | None]:
    """One loaded model per requested precision, or the line that says why (d) is skipped."""
    from pathlib import Path

    from rrm_engine.model.gguf_loader import cache_root

    from .llamacpp import LlamaCpp, gguf_file, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return [], reason
    if device.type != "cpu" or opts.shape is not None:
        return [], "system (d) llama.cpp: skipped, it runs the CPU build on a GGUF model (not --device cuda / --shape)"
    if opts.model in ("embedded", "smollm2-135m"):
        source = embedded_gguf()
    elif opts.model.endswith(".gguf"):
        source = Path(opts.model)
    else:
        return [], f"system (d) llama.cpp: skipped, it needs a .gguf model (got {opts.model})"
    threads = torch.get_num_threads()
    fa = {"auto": -1, "on": 1, "off": 0}[opts.llamacpp_flash_attn]
    return [LlamaCpp(gguf_file(source, p, cache_root() / "llamacpp"), p, threads, opts.llamacpp_kv_unified, fa)
            for p in opts.llamacpp], None


def _shape_of(llm: Any) -> Shape:
    c = llm.loaded.config
    return Shape(c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
                 c.vocab_size, c.tie_word_embeddings, c.qkv_bias)


def _judge(setup: Setup, rec: RecordingLLM, votes: int, gen_len: int) -> Any:
    return _judge_cls()(rec, votes=votes, max_tokens=gen_len, temperature=setup.opts.temperature, strict=True,
                        swap="none", seed=setup.opts.seed)


def _methods(opts: Options) -> list[str]:
    return ["knockout", "elo"] if opts.method == "both" else [opts.method]


def run_judge(setup: Setup, work: Workload, votes: int, gen_len: int, methods: list[str],
              on_step: Any = None) -> tuple[SystemResult, RecordingLLM]:
    """System (c): the judge ranks every query; returns its result and the recorder (prompts, steps)."""
    llm = setup.llm_c
    llm.invalidate_prefix_cache()  # nothing left over from the warm-up or an earlier run
    llm.reset_metrics()
    rec = RecordingLLM(llm, gen_len, on_step=on_step)
    judge = _judge(setup, rec, votes, gen_len)
    items = list(zip(work.queries, work.candidates))
    sync(setup.device)
    t = time.perf_counter()
    try:
        for m in methods:
            with phase(f"judge.rank_batch[{m}]"):
                judge.rank_batch(items, method=m)
    finally:
        rec.close()
    sync(setup.device)
    seconds = time.perf_counter() - t
    m = llm.metrics()
    recs = list(rec.records.values())
    decode_s = sum(t for t, d in rec.step_log if d["prefill_tokens_computed"] == 0)
    in_steps = sum(t for t, _ in rec.step_log)
    # where the wall time went: steps with prefill work, pure decode steps, outside step() (judge, python)
    split = {"prefill_steps_s": in_steps - decode_s, "decode_steps_s": decode_s, "outside_steps_s": seconds - in_steps}
    res = SystemResult("c: rrm_engine, all on", seconds, len(recs), m["generated_tokens"],
                       sum(len(r.prompt_ids) for r in recs), m["prefill_tokens_computed"],
                       m["kv_blocks_peak"] * setup.bytes_per_block, [r.t_done - r.t_added for r in recs],
                       {"engine_metrics": m, "methods": methods, "time_split": split})
    return res, rec


def warm_up(setup: Setup) -> None:
    """Each system once on a small run: first-call costs (allocator, kernels, caches) stay out of the timing."""
    o = setup.opts
    work = make_workload(_judge(setup, RecordingLLM(setup.llm_c, 2), 2, 2).builder, 1, 2, 64, seed=o.seed + 1,
                         pandalm=o.pandalm)
    _, rec = run_judge(setup, work, 2, 2, ["knockout"])
    prompts = [(r.prompt_ids, r.n) for r in rec.records.values()]
    if setup.llm_b is not None:
        run_engine_unshared(setup.llm_b, prompts, 2, o.temperature, o.seed, setup.bytes_per_block, setup.device)
    if setup.hf is not None:
        run_hf(setup.hf, prompts, 2, o.hf_batch, _pad_id(setup), o.temperature, o.seed)
    for lc in setup.llamacpp:
        run_llamacpp(lc, prompts, 2, o.temperature, o.seed)


def _pad_id(setup: Setup) -> int:
    t = setup.tokenizer
    for v in (getattr(t, "pad_token_id", None), getattr(t, "eos_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


# --------------------------------------------------------------------------------- one run
def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[i]


def summarize(r: SystemResult) -> dict:
    return {
        "system": r.name, "seconds": r.seconds, "comparisons": r.comparisons,
        "comparisons_per_s": r.comparisons_per_s, "generated_tokens": r.generated_tokens,
        "generated_tokens_per_s": r.tokens_per_s, "prefill_tokens_requested": r.prefill_requested,
        "prefill_tokens_computed": r.prefill_computed, "kv_peak_bytes": r.kv_peak_bytes,
        "p50_s_per_comparison": percentile(r.latencies, 50), "p99_s_per_comparison": percentile(r.latencies, 99),
        "notes": r.notes,
    }


def compare(setup: Setup, votes: int, prompt_len: int, gen_len: int, log=print) -> dict:
    """One side-by-side run of the selected systems on one workload; returns the report dict."""
    o = setup.opts
    builder = _judge(setup, RecordingLLM(setup.llm_c, gen_len), votes, gen_len).builder
    work = make_workload(builder, o.queries, o.candidates, prompt_len, seed=o.seed, pandalm=o.pandalm)
    if work.why:
        log(f"[workload] synthetic text: {work.why}")
    methods = _methods(o)
    res_c, rec = run_judge(setup, work, votes, gen_len, methods)
    prompts = [(r.prompt_ids, r.n) for r in rec.records.values()]
    lens = [len(p) for p, _ in prompts]
    log(f"[workload] {o.queries} queries x {o.candidates} candidates ({work.source} text), {'+'.join(methods)}, "
        f"k={votes}, gen-len {gen_len}: {len(prompts)} comparisons judged by (c), prompts "
        f"{min(lens)}..{max(lens)} tokens (mean {statistics.mean(lens):.0f}); (a) and (b) replay the same prompts")
    results: dict[str, SystemResult] = {}
    if "c" in o.systems:
        results["c"] = res_c
    if setup.llm_b is not None:
        results["b"] = run_engine_unshared(setup.llm_b, prompts, gen_len, o.temperature, o.seed,
                                           setup.bytes_per_block, setup.device)
    if setup.hf is not None:
        results["a"] = run_hf(setup.hf, prompts, gen_len, o.hf_batch, _pad_id(setup), o.temperature, o.seed)
    for lc in setup.llamacpp:
        results[f"d:{lc.precision}"] = run_llamacpp(lc, prompts, gen_len, o.temperature, o.seed,
                                                    setup.shape.kv_bytes_per_token(2))
    fastest_d = max((k for k in results if k.startswith("d:")), key=lambda k: results[k].tokens_per_s, default=None)
    if fastest_d is not None:
        results["d"] = results[fastest_d]
    report: dict[str, Any] = {
        "params": {"votes": votes, "prompt_len": prompt_len, "gen_len": gen_len, "queries": o.queries,
                   "candidates": o.candidates, "methods": methods, "comparisons": len(prompts),
                   "mean_prompt_tokens": statistics.mean(lens), "text_source": work.source, "text_source_why": work.why,
                   "hf_prompts_per_generate_call": o.hf_batch},
        "systems": {k: summarize(v) for k, v in sorted(results.items()) if k != "d"},
        "ratios": {},
    }
    if fastest_d is not None:
        report["llamacpp_fastest"] = fastest_d
    elif setup.llamacpp_note:
        report["llamacpp_skipped"] = setup.llamacpp_note
    for base in ("a", "b", "d"):
        if "c" in results and base in results:
            report["ratios"][f"c/{base}"] = {
                "generated_tokens_per_s": results["c"].tokens_per_s / results[base].tokens_per_s,
                "comparisons_per_s": results["c"].comparisons_per_s / results[base].comparisons_per_s,
            }
    if "c" in results:
        from rrm_engine.layers.weight_formats import served_weight_bytes
        rl = decode_roofline(rec.step_log, setup.shape, setup.kv_elem, statistics.mean(lens), gen_len, votes,
                             setup.ceilings[0], setup.ceilings[1], served_weight_bytes(setup.llm_c.loaded.model))
        report["roofline_c"] = rl.as_dict() if rl is not None else None
        report["roofline_line"] = rl.line() if rl is not None else "roofline: no pure decode step in (c)"
    return report


def format_report(rep: dict) -> str:
    p = rep["params"]
    lines = [f"k={p['votes']} votes, prompt ~{p['mean_prompt_tokens']:.0f} tokens, gen-len {p['gen_len']}, "
             f"{p['comparisons']} comparisons ({'+'.join(p['methods'])}); (a) batches "
             f"{p['hf_prompts_per_generate_call']} prompts per generate call",
             f"{'system':<28}{'cmp/s':>8}{'gen tok/s':>11}{'prefill computed/requested':>28}"
             f"{'KV peak MB':>12}{'p50 s':>8}{'p99 s':>8}"]
    for s in rep["systems"].values():
        pre = f"{s['prefill_tokens_computed']}/{s['prefill_tokens_requested']}"
        lines.append(f"{s['system']:<28}{s['comparisons_per_s']:>8.3f}{s['generated_tokens_per_s']:>11.1f}{pre:>28}"
                     f"{s['kv_peak_bytes'] / 2**20:>12.1f}{s['p50_s_per_comparison']:>8.2f}"
                     f"{s['p99_s_per_comparison']:>8.2f}")
    for k, v in rep["ratios"].items():
        against = f" (llama.cpp at its fastest precision here, {rep['llamacpp_fastest'][2:].upper()})" if k == "c/d" else ""
        lines.append(f"ratio {k}: {v['generated_tokens_per_s']:.2f}x generated tokens/s, "
                     f"{v['comparisons_per_s']:.2f}x comparisons/s{against}")
    if "llamacpp_skipped" in rep:
        lines.append(rep["llamacpp_skipped"])
    split = rep["systems"].get("c", {}).get("notes", {}).get("time_split")
    if split:
        lines.append("c time: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.2f}s" for k, v in split.items()))
    if "roofline_line" in rep:
        lines.append(rep["roofline_line"] + " (context = mean prompt + gen-len/2)")
    return "\n".join(lines)


def plot_sweep(path: str, param: str, runs: list[dict]) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (f"--plot {path}: matplotlib is not installed (pip install matplotlib); "
                "the sweep's numbers are in the table above and in --json")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({k for r in runs for k in r["systems"]})
    for key in keys:
        pts = [(r["sweep_value"], r["systems"][key]["generated_tokens_per_s"]) for r in runs if key in r["systems"]]
        if pts:
            name = next(r["systems"][key]["system"] for r in runs if key in r["systems"])
            ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if key.startswith("d") else "-")
    values = [r["sweep_value"] for r in runs]
    if min(values) > 0 and max(values) >= 8 * min(values):  # e.g. gen-len 32..1024: doublings equally spaced
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
    ax.set_xlabel(param)
    ax.set_ylabel("generated tokens/s")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return f"plot written to {path}"


def main(argv: list[str] | None = None) -> dict:
    o = parse_args(argv)
    log = (lambda *a, **k: None) if o.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    torch.manual_seed(o.seed)
    if o.threads is not None:
        torch.set_num_threads(o.threads)
    setup = build(o, log)
    t = time.perf_counter()
    mm = matmul_rate(setup.device, setup.dtype)
    served = setup.llm_c.weights if setup.llm_c is not None else None
    if served in ("q8_0", "q4_1"):  # (c) multiplies with int8 dot products: a higher compute ceiling
        mm = max(mm, quant_linear_rate(served))
    setup.ceilings = (copy_bandwidth(setup.device), mm)
    log(f"[ceilings] copy {setup.ceilings[0] / 1e9:.2f} GB/s, mm {setup.ceilings[1] / 1e9:.1f} GFLOP/s"
        f"{f' (the {served} linear)' if served in ('q8_0', 'q4_1') else ''} ({time.perf_counter() - t:.1f}s)")
    t = time.perf_counter()
    warm_up(setup)
    log(f"[warm-up] {time.perf_counter() - t:.1f}s")
    from rrm_engine import threads
    if setup.device.type == "cpu":
        log(f"[threads] {torch.get_num_threads()} torch threads; {threads.describe()}")
    out: dict[str, Any] = {"device": str(setup.device), "dtype": str(setup.dtype).replace("torch.", ""),
                           "model": setup.model_note, "torch_threads": torch.get_num_threads(),
                           "openmp": threads.describe(),
                           "ceilings": {"copy_bytes_per_s": setup.ceilings[0], "mm_flops_per_s": setup.ceilings[1]}}
    if o.sweep is None:
        rep = compare(setup, o.votes, o.prompt_len, o.gen_len, log)
        print(format_report(rep), flush=True)
        out["run"] = rep
    else:
        runs = []
        for v in o.sweep_values:
            vals = {"votes": o.votes, "prompt_len": o.prompt_len, "gen_len": o.gen_len}
            vals[SWEEPABLE[o.sweep]] = v
            rep = compare(setup, vals["votes"], vals["prompt_len"], vals["gen_len"], log)
            rep["sweep_value"] = v
            print(f"--- {o.sweep} = {v}\n{format_report(rep)}", flush=True)
            runs.append(rep)
        out["sweep"] = {"param": o.sweep, "runs": runs}
        if o.plot:
            print(plot_sweep(o.plot, o.sweep, runs), flush=True)
    if o.profile:
        builder = _judge(setup, RecordingLLM(setup.llm_c, o.gen_len), o.votes, o.gen_len).builder
        work = make_workload(builder, o.queries, o.candidates, o.prompt_len, seed=o.seed, pandalm=o.pandalm)
        path, table = profile_run(lambda tick: run_judge(setup, work, o.votes, o.gen_len, _methods(o), tick),
                                  o.profile, setup.device, steps=o.profile_steps)
        print(f"[profile] system (c) trace: {path}\n{table}", flush=True)
        out["profile_trace"] = str(path)
    if o.json:
        with open(o.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        log(f"[json] {o.json}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
