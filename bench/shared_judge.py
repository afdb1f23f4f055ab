"""One shared judge server vs each trainer rank holding its own judge: 2 ranks, the same work.

    python -m bench.shared_judge                       # embedded model, 2 ranks x 8 pairs, k=4, 64 tokens
    python -m bench.shared_judge --pairs 4 --json out.json

(per-rank) two processes, each loads the model into its own LLM + Judge (its own KV cache) and
           judges its half of the pairs (Judge.compare_batch); torch threads per process: --rank-threads.
(shared)   one `python -m rrm_engine serve` process (torch threads: --server-threads) and two client
           processes that send their halves at the same time (JudgeClient.compare_batch over HTTP).

Both configurations judge the same pairs with the same seeds, so they do the same work (generated
tokens are printed side by side and must agree). Reported: wall time from the common start to the
last rank done, generated tokens / wall, and peak resident memory (VmHWM) of every process; the
clients' memory is mostly torch, which a trainer process holds anyway, so it is shown apart.
Each rank starts when both are ready (loaded), so loading is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORDS = ("the model answer response query result value system method function data process example first "
         "second because however therefore which would should could between through during important simple "
         "clear step analysis reason evidence detail accurate helpful concise user question explain").split()


def pairs(n: int, seed: int, words: int) -> list[list[str]]:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    return [[text(12) + "?", text(words), text(words)] for _ in range(n)]


def vm_hwm_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.02)


# ------------------------------------------------------------------------------- roles (processes)
def role_rank(a: argparse.Namespace) -> None:
    """Its own judge: load, say ready, wait for go, judge its pairs."""
    import rrm_engine as rrm

    judge = rrm.Judge.from_pretrained(a.model, kv_cache_tokens=a.kv_tokens, **judge_kwargs(a))
    items = [tuple(x) for x in json.loads(a.items)]
    judge.compare_batch(items[:1])  # warm-up on one pair: first-call costs out of the timing
    judge.llm.reset_metrics()
    Path(a.ready).touch()
    _wait_for(Path(a.go), 600)
    t0 = time.time()
    out = judge.compare_batch(items)
    t1 = time.time()
    m = judge.llm.metrics()
    Path(a.out).write_text(json.dumps({"start": t0, "end": t1, "generated_tokens": m["generated_tokens"],
                                       "votes": sum(len(c.votes) for c in out), "vm_hwm_mb": vm_hwm_mb(),
                                       "errors": sum(c.error is not None for c in out)}))
    judge.engine.shutdown()


def role_client(a: argparse.Namespace) -> None:
    """A rank that uses the shared server."""
    from rrm_engine.serving.client import JudgeClient

    client = JudgeClient(a.url, timeout=3600)
    items = [tuple(x) for x in json.loads(a.items)]
    Path(a.ready).touch()
    _wait_for(Path(a.go), 600)
    t0 = time.time()
    out = client.compare_batch(items)
    t1 = time.time()
    Path(a.out).write_text(json.dumps({"start": t0, "end": t1, "votes": sum(len(c.votes) for c in out),
                                       "vm_hwm_mb": vm_hwm_mb(), "errors": sum(c.error is not None for c in out)}))


# ------------------------------------------------------------------------------------- driver
def judge_kwargs(a: argparse.Namespace) -> dict:
    return dict(votes=a.votes, max_tokens=a.max_tokens, temperature=0.6, swap="none", seed=a.seed)


def _env(threads: int) -> dict:
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def _run_ranks(a: argparse.Namespace, tmp: Path, role: str, tag: str, halves: list, threads: int,
               extra: list[str]) -> list[dict]:
    go = tmp / f"{tag}.go"
    procs, outs, readies = [], [], []
    for r, half in enumerate(halves):
        out, ready = tmp / f"{tag}{r}.json", tmp / f"{tag}{r}.ready"
        cmd = [sys.executable, "-m", "bench.shared_judge", "--role", role, "--items", json.dumps(half),
               "--out", str(out), "--ready", str(ready), "--go", str(go), "--model", a.model,
               "--votes", str(a.votes), "--max-tokens", str(a.max_tokens), "--kv-tokens", str(a.kv_tokens),
               "--seed", str(a.seed), *extra]
        procs.append(subprocess.Popen(cmd, env=_env(threads)))
        outs.append(out)
        readies.append(ready)
    try:
        for ready, p in zip(readies, procs):
            deadline = time.monotonic() + 600
            while not ready.exists():
                if p.poll() is not None:
                    raise RuntimeError(f"a {role} process exited with {p.returncode} before it was ready")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{role} not ready")
                time.sleep(0.05)
        go.touch()
        for p in procs:
            if p.wait(timeout=3600) != 0:
                raise RuntimeError(f"a {role} process failed ({p.returncode})")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [json.loads(o.read_text()) for o in outs]


def _metric(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def per_rank(a: argparse.Namespace, tmp: Path, halves: list) -> dict:
    ranks = _run_ranks(a, tmp, "rank", "rank", halves, a.rank_threads, [])
    wall = max(r["end"] for r in ranks) - min(r["start"] for r in ranks)
    tokens = sum(r["generated_tokens"] for r in ranks)
    return {"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall,
            "judge_memory_mb": sum(r["vm_hwm_mb"] for r in ranks), "rank_memory_mb": [r["vm_hwm_mb"] for r in ranks],
            "errors": sum(r["errors"] for r in ranks), "torch_threads": [a.rank_threads] * 2}


def shared(a: argparse.Namespace, tmp: Path, halves: list, server_threads: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "rrm_engine", "serve", "--model", a.model, "--port", str(port),
           "--kv-cache-tokens", str(a.kv_tokens), "--votes", str(a.votes), "--max-tokens", str(a.max_tokens),
           "--temperature", "0.6", "--swap", "none", "--seed", str(a.seed), "--log-level", "warning"]
    server = subprocess.Popen(cmd, env=_env(server_threads))
    try:
        import httpx

        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not come up")
            time.sleep(0.5)
        # warm-up on each half's first pair, as each rank warms its own judge
        httpx.post(f"{url}/v1/judge/compare", json={"items": [halves[0][0], halves[1][0]]}, timeout=600)
        before = _metric(url, "rrm_generated_tokens_total")
        ranks = _run_ranks(a, tmp, "client", f"client{server_threads}", halves, 1, ["--url", url])
        tokens = _metric(url, "rrm_generated_tokens_total") - before
        server_mb = vm_hwm_mb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    wall = max(r["end"] for r in ranks) - min(r["start"] for r in ranks)
    return {"wall_s": wall, "generated_tokens": int(tokens), "tokens_per_s": tokens / wall,
            "judge_memory_mb": server_mb, "client_memory_mb": [r["vm_hwm_mb"] for r in ranks],
            "errors": sum(r["errors"] for r in ranks), "torch_threads": server_threads}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shared_judge", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--pairs", type=int, default=8, help="pairs per rank")
    p.add_argument("--words", type=int, default=120, help="words per response (prompt length)")
    p.add_argument("--votes", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per vote (the thinking budget)")
    p.add_argument("--kv-tokens", type=int, default=8192, help="KV cache of each engine")
    p.add_argument("--rank-threads", type=int, default=1, help="torch threads of each per-rank judge")
    p.add_argument("--server-threads", default="1,2", help="torch threads of the shared server (comma list: one run each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    # roles (internal)
    p.add_argument("--role", choices=("rank", "client"), default=None, help=argparse.SUPPRESS)
    for name in ("--items", "--out", "--ready", "--go", "--url"):
        p.add_argument(name, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.role == "rank":
        role_rank(a)
        return 0
    if a.role == "client":
        role_client(a)
        return 0
    import tempfile

    work = pairs(2 * a.pairs, a.seed, a.words)
    halves = [work[: a.pairs], work[a.pairs:]]
    print(f"[shared_judge] model {a.model}; 2 ranks x {a.pairs} pairs, k={a.votes} votes, {a.max_tokens} tokens "
          f"per vote, KV {a.kv_tokens} tokens per engine; load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, Any] = {"params": vars(a) | {"date": time.strftime("%Y-%m-%d %H:%M")}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results["per_rank"] = per_rank(a, tmp, halves)
        for t in (int(x) for x in a.server_threads.split(",")):
            results[f"shared_{t}t"] = shared(a, tmp, halves, t)
    results["load_average_end"] = os.getloadavg()[0]
    base = results["per_rank"]
    print(f"\n{'config':<22}{'wall s':>9}{'gen tokens':>12}{'tok/s':>9}{'judge MB':>10}{'clients MB':>12}")
    for name, r in results.items():
        if not isinstance(r, dict) or "wall_s" not in r:
            continue
        clients = "-" if "client_memory_mb" not in r else "+".join(f"{x:.0f}" for x in r["client_memory_mb"])
        print(f"{name:<22}{r['wall_s']:>9.2f}{r['generated_tokens']:>12}{r['tokens_per_s']:>9.1f}"
              f"{r['judge_memory_mb']:>10.0f}{clients:>12}")
    for name, r in results.items():
        if name.startswith("shared"):
            print(f"{name} / per_rank: tokens/s x{r['tokens_per_s'] / base['tokens_per_s']:.2f}, "
                  f"judge memory x{r['judge_memory_mb'] / base['judge_memory_mb']:.2f}"
                  + ("" if r["generated_tokens"] == base["generated_tokens"] else "  (generated tokens differ!)"))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
