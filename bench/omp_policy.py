"""Does the import order matter? One compare on the embedded model, timed in fresh processes:

  rrm_engine first    import rrm_engine, then torch: rrm_engine sets OMP_WAIT_POLICY=PASSIVE in time
  torch first         import torch, then rrm_engine: libgomp already runs with its default (spinning) policy
  torch first + env   the same, with OMP_WAIT_POLICY=PASSIVE in the environment (the fix the warning gives)

The variants alternate round by round, so load from other jobs hits them alike; the ratios are of
medians. Spinning threads hurt only when the cores are busy: on an idle machine expect ~1x.

    python -m bench.omp_policy [--rounds 3] [--threads 2] [--votes 3] [--max-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
order, threads, votes, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if order == "torch":
    import torch
    import rrm_engine
else:
    import rrm_engine
    import torch
import warnings
warnings.simplefilter("ignore")
torch.set_num_threads(threads)
judge = rrm_engine.Judge(rrm_engine.LLM("embedded", device="cpu"), max_tokens=max_tokens, seed=0)
judge.compare("Warm up.", "a", "b", votes=1)
t = time.perf_counter()
c = judge.compare("What is the capital of France?", "Paris.", "Berlin.", votes=votes)
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": c.tokens_used}))
"""

VARIANTS = {  # name -> (import order, extra environment)
    "rrm_engine first": ("rrm_engine", {}),
    "torch first": ("torch", {}),
    "torch first + env": ("torch", {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def run_once(order: str, extra_env: dict, opts: argparse.Namespace) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", CHILD, order, str(opts.threads), str(opts.votes), str(opts.max_tokens)],
                         env=env, capture_output=True, text=True, timeout=opts.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({order}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.omp_policy", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--votes", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=int, default=600, help="per child process, seconds")
    opts = p.parse_args()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(opts.rounds):
        for name, (order, env) in VARIANTS.items():
            s = run_once(order, env, opts)
            times[name].append(s)
            print(f"round {r + 1}: {name:18s} {s:6.1f} s", flush=True)
    base = statistics.median(times["rrm_engine first"])
    print(f"\n{opts.threads} threads, compare with {opts.votes} votes x {opts.max_tokens} tokens, medians of {opts.rounds}:")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:18s} {m:6.1f} s  ({m / base:.2f}x rrm_engine first)  all: {', '.join(f'{t:.1f}' for t in ts)}")


if __name__ == "__main__":
    main()
