"""Running the real command line in a subprocess, on this checkout (not the installed copy)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOADING = "loading "  # what the CLI prints just before it loads a model (cli.make_judge)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")  # this tree, whatever is installed
    env.setdefault("OMP_NUM_THREADS", os.environ.get("RRM_TEST_THREADS", "1"))  # the shared cores
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rrm_engine", *args]


def foreground_cli_command(*args: str) -> list[str]:
    """cli_command with Ctrl-C raising KeyboardInterrupt as in a terminal's foreground job, whatever this
    process inherited: a job started with `&` by a non-interactive shell (CI scripts, nohup) has SIGINT
    ignored, its children inherit that, and Python then installs no KeyboardInterrupt handler."""
    boot = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv[0] = 'rrm_engine'; runpy.run_module('rrm_engine', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", boot, *args]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, cwd=cwd or REPO,
                          env=cli_env(**env), timeout=timeout)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
