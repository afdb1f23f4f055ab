"""Serving benchmark (vLLM's benchmarks/benchmark_serving.py is the anchor): the HTTP front of
`rrm-engine serve` with N = 1 (one engine in process) and N = 2... replicas (Ray actors), driven by
judge requests and streamed completions at a request rate (Poisson arrivals) or a fixed concurrency.

    python -m bench.serving                                   # embedded model, N=1 vs N=2, concurrency 4
    python -m bench.serving --replicas 1,2 --rate 2 --requests 32 --votes 2 --max-tokens 16
    python -m bench.serving --ray-address auto --replicas 1,2,4 --device cuda --model path/to/RRM-7B

Reported per N: judge requests (POST /v1/judge/compare, --items-per-request comparisons of one
query each): end-to-end p50/p90/p99 and judgments (comparisons) per second; streamed completions
(POST /v1/completions, stream, the judge's own prompt for one comparison, --max-tokens tokens):
TTFT, time per output token (per request: (last - first token) / (tokens - 1)) and end-to-end
percentiles. Requests of one query share its prefix, as a judge's do; queries cycle over --queries.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def drive(n: int, rate: float | None, concurrency: int, make: Any) -> float:
    """Run n requests (make(i) -> coroutine), Poisson at `rate`/s or `concurrency` at a time; wall seconds."""
    sem = asyncio.Semaphore(concurrency if rate is None else n)
    rng = random.Random(0)

    async def one(i: int) -> None:
        async with sem:
            await make(i)

    t0 = time.perf_counter()
    tasks = []
    for i in range(n):
        tasks.append(asyncio.ensure_future(one(i)))
        if rate is not None:
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return time.perf_counter() - t0


async def bench_one(url: str, args: argparse.Namespace, prompt_of: Any) -> dict:
    import httpx
    queries = [f"Question {q}: which answer explains the idea of number {q} better?" for q in range(args.queries)]
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        e2e: list[float] = []

        async def judge(i: int) -> None:
            q = queries[i % len(queries)]
            items = [[q, f"Answer {i}.{j}: it is {j} because of {i}.", f"Answer {i}.{j}b: no."]
                     for j in range(args.items_per_request)]
            t = time.perf_counter()
            r = await http.post("/v1/judge/compare", json={"items": items, "votes": args.votes})
            r.raise_for_status()
            e2e.append(time.perf_counter() - t)

        wall = await drive(args.requests, args.rate, args.concurrency, judge)
        out["judge"] = {"requests": args.requests, "wall_s": wall,
                        "judgments_per_s": args.requests * args.items_per_request / wall,
                        **{f"e2e_p{p}_s": pct(e2e, p) for p in (50, 90, 99)}}
        ttft: list[float] = []
        tpot: list[float] = []
        e2e_c: list[float] = []

        async def complete(i: int) -> None:
            body = {"prompt": prompt_of(queries[i % len(queries)], i), "max_tokens": args.max_tokens,
                    "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": True}
            t = time.perf_counter()
            times = []
            async with http.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())
            e2e_c.append(time.perf_counter() - t)
            if times:
                ttft.append(times[0] - t)
                if len(times) > 1:
                    tpot.append((times[-1] - times[0]) / (len(times) - 1))

        wall = await drive(args.requests, args.rate, args.concurrency, complete)
        out["completions"] = {"requests": args.requests, "wall_s": wall,
                              **{f"ttft_p{p}_s": pct(ttft, p) for p in (50, 90, 99)},
                              **{f"tpot_p{p}_s": pct(tpot, p) for p in (50, 90, 99)},
                              **{f"e2e_p{p}_s": pct(e2e_c, p) for p in (50, 90, 99)},
                              "tpot_mean_s": statistics.fmean(tpot) if tpot else float("nan")}
    return out


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """uvicorn on a free loopback port in a daemon thread, until the block ends."""
    import socket
    import threading

    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        v = kind(text)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def sizes(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of ints >= 1, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"a comma-separated list of ints >= 1, got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--replicas", type=sizes, default="1,2", help="data-parallel sizes to compare (default 1,2)")
    p.add_argument("--requests", type=positive(int), default=16, help="requests per phase")
    p.add_argument("--rate", type=positive(float), default=None, help="requests/s, Poisson (default: --concurrency)")
    p.add_argument("--concurrency", type=positive(int), default=4)
    p.add_argument("--queries", type=positive(int), default=4, help="distinct queries the requests cycle over")
    p.add_argument("--items-per-request", type=positive(int), default=2)
    p.add_argument("--votes", type=positive(int), default=2)
    p.add_argument("--max-tokens", type=positive(int), default=16, help="the judge's budget and each completion's length")
    p.add_argument("--replica-cpus", type=positive(float), default=1.0,
                   help="CPUs (and torch threads) of each replica; N=1 runs in process with as many threads")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rrm_engine.judge import Judge
    from rrm_engine.serving.server import build_app

    llm_kw = {"device": args.device}
    judge_kw = {"votes": args.votes, "max_tokens": args.max_tokens, "temperature": 0.7, "seed": 0}
    results = {}
    for n in args.replicas:
        if n == 1:
            # the threads one replica gets (Ray sets OMP_NUM_THREADS to an actor's CPUs): N=1 vs N=2 then
            # compares one engine with two of the same kind, not thread counts
            import torch
            torch.set_num_threads(max(1, int(args.replica_cpus)))
            backend = Judge.from_pretrained(args.model, **judge_kw, **llm_kw)
        else:
            import ray

            from rrm_engine.judge.pool import JudgePool
            if not ray.is_initialized():  # workers import the checkout, as this process does
                root = str(Path(__file__).resolve().parents[1])
                os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
                ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
            backend = JudgePool(args.model, num_replicas=n, llm_kwargs=llm_kw, judge_kwargs=judge_kw,
                                num_cpus=args.replica_cpus)
        builder = backend.builder if n == 1 else Judge.from_pretrained(args.model, **judge_kw, **llm_kw).builder

        def prompt_of(q: str, i: int) -> list[int]:
            return builder.build(q, f"Answer {i}: it is so.", f"Answer {i}b: no.").token_ids

        try:
            with live_server(build_app(backend, "bench")) as url:
                asyncio.run(bench_one(url, args, prompt_of))  # warm-up (first prefill, thread pools)
                results[n] = asyncio.run(bench_one(url, args, prompt_of))
        finally:
            if n == 1:
                backend.engine.shutdown()
            else:
                backend.shutdown()
        print(f"N={n}: {json.dumps(results[n], indent=1)}", flush=True)
    print("\n| N | judgments/s | judge e2e p50 / p90 / p99 s | TTFT p50 / p90 s | TPOT p50 / p90 ms | completion e2e p50 s |")
    print("|---|---|---|---|---|---|")
    for n, r in results.items():
        j, c = r["judge"], r["completions"]
        print(f"| {n} | {j['judgments_per_s']:.2f} | {j['e2e_p50_s']:.2f} / {j['e2e_p90_s']:.2f} / {j['e2e_p99_s']:.2f} "
              f"| {c['ttft_p50_s']:.2f} / {c['ttft_p90_s']:.2f} | {1e3 * c['tpot_p50_s']:.0f} / {1e3 * c['tpot_p90_s']:.0f} "
              f"| {c['e2e_p50_s']:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
