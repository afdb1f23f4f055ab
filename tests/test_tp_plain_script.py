"""LLM(path, tensor_parallel_size=2) from a plain script, as a user writes one: no
`if __name__ == "__main__":`. The script runs in a subprocess (its own __main__), on CPU (gloo).

Forked workers (this process has no CUDA context) do not re-import the script: the TP=2 tokens
equal the TP=1 tokens the same script computed first (so the fork also happens after the parent
used torch's OpenMP threads: tp_workers._start). Spawned workers (RRM_TP_START_METHOD=spawn, as where
CUDA is initialised) re-import it: the script dies with one line saying what to add.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = '''
import json, sys
import torch
import rrm_engine as rrm

path = sys.argv[1]
prompts = [[5, 6, 7, 8, 9], [100, 200, 300], [42] * 20]
greedy = rrm.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
{body}
'''

BOTH = '''
one = rrm.LLM(path, device="cpu", dtype=torch.float32, kv_cache_tokens=1024)
ref = [o.outputs[0].token_ids for o in one.generate(prompts, greedy)]
torch.set_num_threads(2)  # the parent's OpenMP pool is in use before the workers start
two = rrm.LLM(path, device="cpu", dtype=torch.float32, kv_cache_tokens=1024, tensor_parallel_size=2)
got = [o.outputs[0].token_ids for o in two.generate(prompts, greedy)]
print(json.dumps({"ref": ref, "got": got, "method": two.engine.start_method,
                  "workers": [proc.pid for proc in two.engine._procs]}), flush=True)
import os, signal
os.kill(os.getpid(), signal.SIGKILL)  # no exit handler runs: the workers must see their parent gone
'''

TP_ONLY = '''
two = rrm.LLM(path, device="cpu", dtype=torch.float32, kv_cache_tokens=1024, tensor_parallel_size=2)
print("built", flush=True)
'''


def run_script(tmp_path: Path, body: str, model_dir: Path, env: dict[str, str] | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess:
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent(SCRIPT.format(body=body)))
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's rrm_engine, as pytest imports it
    full_env = {k: v for k, v in os.environ.items() if k != "RRM_TP_START_METHOD"}
    full_env.update(PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]), **(env or {}))
    # output to files, not pipes: workers that outlive the script would hold a pipe open and hang run()
    with open(tmp_path / "out", "w+") as out, open(tmp_path / "err", "w+") as err:
        r = subprocess.run([sys.executable, str(script), str(model_dir)], stdout=out, stderr=err, timeout=timeout,
                           env=full_env, cwd=tmp_path)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(r.args, r.returncode, out.read(), err.read())


def test_plain_script_forks_its_ranks(tmp_path, tiny_qwen2_dir):
    r = run_script(tmp_path, BOTH, tiny_qwen2_dir)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["method"] == "fork"
    assert out["got"] == out["ref"] and all(len(t) == 8 for t in out["ref"])
    # killed, the script left its workers waiting for the next call: they leave on their own
    deadline = time.monotonic() + 30
    while alive := [pid for pid in out["workers"] if running(pid)]:
        if time.monotonic() > deadline:
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"workers {alive} outlived their parent")
        time.sleep(0.2)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a container's init may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_spawned_ranks_of_an_unguarded_script_say_what_to_add(tmp_path, tiny_qwen2_dir):
    r = run_script(tmp_path, TP_ONLY, tiny_qwen2_dir, env={"RRM_TP_START_METHOD": "spawn"})
    assert r.returncode != 0 and "built" not in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: tensor_parallel_size=2: the workers are spawned "
                           "(RRM_TP_START_METHOD=spawn) and re-import "), r.stderr[-3000:]
    assert last.endswith('put that code under `if __name__ == "__main__":`') and "plain.py" in last
    # the workers exit quietly: no bootstrapping traceback of multiprocessing buries the line
    assert "bootstrapping phase" not in r.stderr and r.stderr.count("Traceback") == 1, r.stderr[-3000:]


def test_bad_start_method_is_named(monkeypatch):
    from rrm_engine.distributed.tp_workers import start_method
    monkeypatch.setenv("RRM_TP_START_METHOD", "thread")
    with pytest.raises(ValueError, match="RRM_TP_START_METHOD='thread': use fork or spawn"):
        start_method()
    monkeypatch.delenv("RRM_TP_START_METHOD")
    import torch
    assert start_method() == ("fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn")
