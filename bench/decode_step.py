"""Decode-step microbenchmark: `python -m bench.decode_step [--rows 8,32] [--context 600]`.

The engine decodes `rows` sequences (k=8 votes per comparison, rows/8 comparisons whose prompts
share a head, as a judge's comparisons of one query do) at about `context` tokens of context, and
every engine step (schedule + forward + sample) is timed. Each line prints the time per step and
per generated token beside the bounds this machine allows for the precision used, gpt-fast style,
with the ceilings measured in the same run:
  * weight-bandwidth bound: every weight byte read once per step, as served (`--weights`: a Q4_1
    model reads its 4.5-bit blocks, not fp32) / the read bandwidth (a large tensor sum; the copy
    bandwidth is printed too);
  * compute bound: 2 x params x rows FLOP (plus attention) / the fastest of torch.mm on a large
    square matrix, the CPU ops' decode GEMM and (quantised weights) the quantised linear, each at
    32 rows on a cache-resident weight.
"x bound" is the step time over the larger of the two (1.0 = at the roofline): the issue's
"within 1.2x of the weight-bandwidth bound" reads off the `x wbw` column, and a line under each
table says whether that target is reachable at all here (it is not where the compute bound alone
exceeds 1.2x the weight bound: the multiplies then take longer than the target allows).
`--breakdown` adds, per row count, the first variant's time per step op by op (the C++ CPU ops
and the serving linears, timed as the decoder calls them) and what is left (Python, scheduling,
metadata, torch glue).

Variants (attention backends, torch.compile, ...) run side by side in one process, interleaved
repetition by repetition, so their ratios hold even on a CPU shared with other jobs; the table
gives each variant's median over the repetitions and its quietest (fastest) repetition.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

import rrm_engine  # noqa: F401  (before torch: sets OMP_WAIT_POLICY)
import torch

from rrm_engine import LLM, SamplingParams

from .roofline import quant_linear_rate
from .workload import _pandalm_rows, _synthetic_text, default_pandalm

VOTES = 8
SHARED_HEAD = 64  # tokens every comparison of the query shares (system prompt + query)


@dataclass
class Ceilings:
    read_bw: float  # B/s, sum over a large tensor
    copy_bw: float  # B/s, read + write bytes of a large copy
    mm_rate: float  # FLOP/s, large square torch.mm in the run's dtype (the BLAS)
    gemm_rate: float  # FLOP/s, the CPU ops' decode GEMM on a cache-resident weight (0: not built)

    @property
    def compute(self) -> float:
        return max(self.mm_rate, self.gemm_rate)


def _best(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_ceilings(dtype: torch.dtype, weights: str, repeat: int = 5) -> Ceilings:
    big = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB, 8x this CPU's L3
    out = torch.empty_like(big)
    read = big.numel() * 4 / _best(lambda: big.sum(), repeat)
    copy = 2 * big.numel() * 4 / _best(lambda: out.copy_(big), repeat)
    del big, out
    n = 1024
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    mm = 2 * n ** 3 / _best(lambda: torch.mm(a, b), repeat)
    gemm = 0.0
    try:  # the GEMM the CPU backend runs decode projections with, at 32 rows, weights in cache
        from rrm_kernels import cpu_ops
        x, w = torch.randn(32, 576).to(dtype), torch.randn(1024, 576).to(dtype)
        gemm = 2 * 32 * 1024 * 576 / _best(lambda: cpu_ops.linear(x, w), 20 * repeat)
    except RuntimeError:
        pass
    if weights in ("q8_0", "q4_1"):  # int8 dot products: a higher ceiling than the dense GEMMs
        gemm = max(gemm, quant_linear_rate(weights, repeat=20 * repeat))
    return Ceilings(read, copy, mm, gemm)


def weight_bytes(llm: LLM) -> int:
    """Bytes of every weight a decode step reads, as served: the linears and the LM head (a tied
    embedding is read in full as the head) plus the norms; the embedding table itself is only
    indexed (rows per step), so it does not count."""
    from rrm_engine.layers.weight_formats import served_weight_bytes
    model = llm.engine.model
    norms = sum(m.weight.numel() * m.weight.element_size() for name, m in model.named_modules()
                if "norm" in name.rsplit(".", 1)[-1] and getattr(m, "weight", None) is not None)
    return served_weight_bytes(model) + norms


def prompts(llm: LLM, rows: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """rows/8 prompts of prompt_len tokens of real text (PandaLM responses when the data set is
    present, else seeded synthetic sentences), all starting with the same SHARED_HEAD tokens.
    Text, not random token ids: the sampler's work depends on how peaked the model's next-token
    distribution is, and random ids make it unrealistically flat."""
    rng = random.Random(seed)
    rows_data = _pandalm_rows(default_pandalm())
    text = lambda: (rows_data[rng.randrange(len(rows_data))][rng.choice(("response1", "response2"))]  # noqa: E731
                    if rows_data else _synthetic_text(rng, 80))
    tok = llm.tokenizer

    def tokens(n: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < n:
            ids += tok.encode(text() + "\n\n")
        return ids[:n]

    head = tokens(SHARED_HEAD)
    return [head + tokens(prompt_len - SHARED_HEAD) for _ in range(max(1, rows // VOTES))]


def start_decoding(llm: LLM, rows: int, context: int, steps: int, warmup: int) -> list[str]:
    """Prefill rows/8 prompts, fork 8 votes each and decode `warmup` steps, so that `steps` more
    decode steps run at a context from about context - steps/2 to context + steps/2."""
    prompt_len = max(SHARED_HEAD + 1, context - steps // 2 - warmup)
    params = SamplingParams(n=VOTES, temperature=0.6, max_tokens=warmup + steps + 2, ignore_eos=True, seed=1)
    ids = [llm.add_request(p, params) for p in prompts(llm, rows, prompt_len)]
    while llm.engine.metrics()["generated_tokens"] < rows:  # prefill (maybe chunked) + the fork
        llm.step()
    for _ in range(warmup):
        llm.step()
    return ids


def time_steps(llm: LLM, rows: int, context: int, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` pure decode steps (schedule + forward + sample)."""
    ids = start_decoding(llm, rows, context, steps, warmup)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        llm.step()
        times.append(time.perf_counter() - t)
    for r in ids:
        llm.abort(r)
    return times


# "cpu-modules": the CPU backend stepping the decoder's modules instead of its flat serving loop
# (rrm_engine/model/cpu_flat_forward.py), to measure what the loop buys
MODULES_SUFFIX = "-modules"


def make_llm(loaded, backend: str, kv_tokens: int, weights: str | None = None, kv_dtype: str | None = None) -> LLM:
    modules = backend.endswith(MODULES_SUFFIX)
    llm = LLM(loaded, attention_backend=backend.removesuffix(MODULES_SUFFIX), kv_cache_tokens=kv_tokens,
              weights=weights, kv_cache_dtype=kv_dtype)
    if modules:
        llm.engine.model.serve_with(llm.engine.model.serving.replace(flat_forward=None))
    return llm


def parse_variant(v: str) -> tuple[str, int | None, str | None]:
    """"cpu", "cpu@1" (one torch thread), "cpu:bf16" (KV cache in bf16), "cpu@1:bf16" -> (backend,
    threads, kv cache dtype)."""
    head, _, kv = v.partition(":")
    backend, _, threads = head.partition("@")
    return backend, int(threads) if threads else None, kv or None


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--weights", default="auto", choices=["auto", "fp32", "bf16", "q8_0", "q4_1"],
                   help="the linears' format, as LLM(weights=...): auto serves a GGUF's own blocks (Q4_1 "
                        "for the embedded model); fp32 is the exact reference")
    p.add_argument("--rows", default="8,32", help="decode rows per step (multiples of 8: 8 votes per comparison)")
    p.add_argument("--context", type=int, default=600, help="tokens of context at the middle of the timed steps")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per repetition")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3, help="repetitions (variants interleaved)")
    p.add_argument("--variants", default="torch,cpu",
                   help="comma-separated attention backends to compare; NAME@N runs NAME with N torch threads, "
                        "NAME:DTYPE with its KV cache in DTYPE, cpu-modules the CPU backend through the decoder's "
                        "modules instead of its flat loop (e.g. cpu,cpu@1,torch,cpu:bf16,cpu-modules)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the first variant's ops one by one at each row count (separate steps)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile 5 decode steps of the first variant at the first row count; trace + table into DIR")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows_list = [int(x) for x in a.rows.split(",")]
    if any(r < 1 or (r > VOTES and r % VOTES) for r in rows_list):
        p.error(f"--rows must be positive and, above {VOTES}, multiples of {VOTES}")
    variants = a.variants.split(",")
    dtype = getattr(torch, a.dtype)

    from rrm_engine import threads
    from rrm_engine.model.loader import load
    loaded = load(a.model, device="cpu", dtype=dtype)
    kv_tokens = 16 * (-(-(max(rows_list) * (a.context + a.steps + a.warmup + 64)) // 16) + 64)
    n_params = sum(t.numel() for t in loaded.model.parameters())  # before a conversion makes them buffers
    first = make_llm(loaded, "torch", 1024, a.weights)  # converts the shared decoder once
    served, wbytes = first.weights, weight_bytes(first)
    del first
    ceil = measure_ceilings(dtype, served)
    cfg = loaded.model.cfg
    print(f"model {a.model} ({n_params / 1e6:.0f}M params, {wbytes / 1e6:.0f} MB of weights served as {served}, activations {a.dtype}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(threads.describe())
    print(f"ceilings (this run): read {ceil.read_bw / 1e9:.1f} GB/s, copy {ceil.copy_bw / 1e9:.1f} GB/s; "
          f"torch.mm 1024^3 {ceil.mm_rate / 1e9:.0f} GFLOP/s, CPU-ops GEMM (32 rows, weight in cache) "
          f"{ceil.gemm_rate / 1e9:.0f} GFLOP/s ({served})")
    results = []
    for rows in rows_list:
        runs: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(a.repeat):
            for v in variants:  # interleaved, so load changes hit every variant alike
                backend, threads, kv_dtype = parse_variant(v)
                before = torch.get_num_threads()
                torch.set_num_threads(threads or before)
                llm = make_llm(loaded, backend, kv_tokens, kv_dtype=kv_dtype)
                runs[v].append(statistics.median(time_steps(llm, rows, a.context, a.steps, a.warmup)))
                del llm
                torch.set_num_threads(before)
        # bounds per step: weights once; compute 2 x params per row + q.k and p.v over the context
        w_bound = wbytes / ceil.read_bw
        flops = 2 * n_params * rows + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * rows * a.context
        c_bound = flops / ceil.compute
        base = statistics.median(runs[variants[0]])
        print(f"\nrows {rows}, context ~{a.context}: weight-bandwidth bound {1e3 * w_bound:.1f} ms/step "
              f"({1e3 * w_bound / rows:.2f} ms/token), compute bound {1e3 * c_bound:.1f} ms/step "
              f"({flops / 1e9:.2f} GFLOP)")
        print(f"{'variant':<12} {'ms/step':>9} {'quietest':>9} {'ms/token':>9} {'tok/s':>8} {'x wbw':>7} "
              f"{'x bound':>8} {'vs first':>9}")
        for b in variants:
            med, best = statistics.median(runs[b]), min(runs[b])
            print(f"{b:<12} {1e3 * med:9.1f} {1e3 * best:9.1f} {1e3 * med / rows:9.2f} {rows / med:8.1f} "
                  f"{med / w_bound:7.2f} {med / max(w_bound, c_bound):8.2f} {base / med:8.2f}x")
            results.append({"rows": rows, "variant": b, "median_s": med, "quietest_s": best, "runs_s": runs[b],
                            "weight_bound_s": w_bound, "compute_bound_s": c_bound,
                            "target_reachable": c_bound <= TARGET_X_WBW * w_bound})
        print(reachability(w_bound, c_bound))
        if a.breakdown:
            backend, threads, kv_dtype = parse_variant(variants[0])
            before = torch.get_num_threads()
            torch.set_num_threads(threads or before)
            table = op_breakdown(loaded, backend, kv_tokens, kv_dtype, rows, a)
            torch.set_num_threads(before)
            print(format_breakdown(variants[0], rows, a.steps, table))
            for r in results[-len(variants):]:
                r["breakdown"] = {name: {"ms_per_step": 1e3 * sec / a.steps, "calls_per_step": calls / a.steps}
                                  for name, (sec, calls) in table.items()}
    if a.profile:
        _profile(loaded, parse_variant(variants[0])[0], rows_list[0], a, kv_tokens)
    return results


TARGET_X_WBW = 1.2  # the decode-step target: within 1.2x of the weight-bandwidth bound


def reachability(w_bound: float, c_bound: float) -> str:
    """One line: can any implementation meet the target on this machine at this precision and row
    count? Not when the multiplies alone (the compute bound, at the fastest rate measured above)
    take longer than TARGET_X_WBW x the weight-bandwidth bound."""
    target = TARGET_X_WBW * w_bound
    if c_bound > target:
        return (f"target {TARGET_X_WBW}x wbw = {1e3 * target:.1f} ms/step: out of reach here, the compute bound alone "
                f"is {1e3 * c_bound:.1f} ms ({c_bound / w_bound:.2f}x wbw)")
    return (f"target {TARGET_X_WBW}x wbw = {1e3 * target:.1f} ms/step: within the compute bound "
            f"({1e3 * c_bound:.1f} ms), reachable in principle")


# What --breakdown times: the C++ extensions' functions, as every caller reaches them (the
# CPU backend's flat forward and the modules' path alike): the CPU ops by their names in the
# extension module, the quantised linears through each one's op, bf16 linears by their forward.
TIMED_CPU_OPS = ("rope_store", "paged_decode", "rms_norm", "silu_mul", "linear", "sample")


def op_breakdown(loaded, backend: str, kv_tokens: int, kv_dtype: str | None, rows: int,
                 a: argparse.Namespace) -> dict[str, tuple[float, int]]:
    """{op: (seconds, calls)} over a.steps decode steps of a fresh LLM, plus "step" (their total
    wall time). Each wrapped call costs about a microsecond of timer overhead."""
    from rrm_kernels import cpu_ops
    from rrm_engine.layers import weight_formats

    spent: dict[str, list] = {}

    def timed(fn, name: str):
        def call(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                rec = spent.setdefault(name, [0.0, 0])
                rec[0] += time.perf_counter() - t
                rec[1] += 1
        return call

    ext = cpu_ops.load()
    patches = [(ext, n, n) for n in TIMED_CPU_OPS]
    patches += [(m, "_op", "quant_linear") for m in loaded.model.modules()
                if isinstance(m, weight_formats.QuantizedLinear)]
    patches += [(weight_formats.Bf16Linear, "forward", "bf16 linear")]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    try:
        for obj, attr, name in patches:
            setattr(obj, attr, timed(getattr(obj, attr), name))
        llm = make_llm(loaded, backend, kv_tokens, kv_dtype=kv_dtype)
        ids = start_decoding(llm, rows, a.context, a.steps, a.warmup)
        spent.clear()
        t = time.perf_counter()
        for _ in range(a.steps):
            llm.step()
        total = time.perf_counter() - t
        for r in ids:
            llm.abort(r)
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)
    table = {name: (rec[0], rec[1]) for name, rec in sorted(spent.items(), key=lambda kv: -kv[1][0])}
    table["step"] = (total, a.steps)
    return table


def format_breakdown(variant: str, rows: int, steps: int, table: dict[str, tuple[float, int]]) -> str:
    total = table["step"][0]
    ops = {k: v for k, v in table.items() if k != "step"}
    rest = total - sum(sec for sec, _ in ops.values())
    lines = [f"\n{variant} at {rows} rows, op by op ({steps} steps, ops timed as called):",
             f"{'op':<26} {'ms/step':>8} {'share':>6} {'calls/step':>11} {'us/call':>8}"]
    for name, (sec, calls) in ops.items():
        lines.append(f"{name:<26} {1e3 * sec / steps:8.2f} {sec / total:6.0%} {calls / steps:11.0f} "
                     f"{1e6 * sec / calls:8.1f}")
    lines.append(f"{'rest (Python, scheduling)':<26} {1e3 * rest / steps:8.2f} {rest / total:6.0%}")
    lines.append(f"{'step':<26} {1e3 * total / steps:8.2f}")
    return "\n".join(lines)


def _profile(loaded, backend: str, rows: int, a, kv_tokens: int) -> None:
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    llm = make_llm(loaded, backend, kv_tokens)
    steps = 5
    ids = start_decoding(llm, rows, a.context, steps, a.warmup)
    out = Path(a.profile)
    out.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            llm.step()
    for r in ids:
        llm.abort(r)
    prof.export_chrome_trace(str(out / f"decode_{backend}_{rows}.json"))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    (out / f"decode_{backend}_{rows}.txt").write_text(table)
    print(f"\nprofile of {backend}, {steps} decode steps at {rows} rows (trace in {out}):\n{table}")


if __name__ == "__main__":
    main()
