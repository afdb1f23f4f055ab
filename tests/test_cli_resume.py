"""Results are streamed, so an interrupted run loses nothing: kill `judge` mid-way (Ctrl-C, and a
SIGKILL that gives it no chance to clean up), run the same command with --resume, and the file
equals the one an uninterrupted run writes (same seeds: each item's votes are seeded by its
content, judge.py)."""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from cli_helpers import REPO, cli_env, foreground_cli_command, read_jsonl, run_cli, write_jsonl

ROWS = [{"id": f"q{i}", "query": f"Which number is larger, {i} or {i + 7}?", "a": str(i), "b": str(i + 7),
         "label": 2} for i in range(10)]
# one item per engine loop, each ~70 ms on the tiny model with the C++ CPU ops: the file fills row by row
ARGS = ["--votes", "2", "--max-tokens", "32", "--batch-size", "1", "--quiet", "--device", "cpu"]


def same(got, want) -> bool:
    """Equal, soft scores (p_first) within 1e-5: the engine's batches depend on when each request
    reached its background loop, and a log-prob's last bits on what shared its batch; tokens,
    verdicts and counts do not (each sample is seeded by itself)."""
    def walk(v):
        if isinstance(v, float):
            return pytest.approx(v, abs=1e-5)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v
    return got == walk(want)


def _judge(pairs, out, model, *extra):
    return ["judge", "--pairs", str(pairs), "--out", str(out), "--model", str(model), *ARGS, *extra]


def _interrupt(args: list[str], out, sig: int, after_rows: int = 3, timeout: float = 240) -> tuple[int, str]:
    """Start the command as a terminal's foreground job, send `sig` once the file `out` holds
    `after_rows` rows; (exit code, stderr)."""
    proc = subprocess.Popen(foreground_cli_command(*args), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= after_rows:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_qwen2_dir):
    tmp = tmp_path_factory.mktemp("resume")
    pairs = write_jsonl(tmp / "pairs.jsonl", ROWS)
    out = tmp / "uninterrupted.jsonl"
    res = run_cli(*_judge(pairs, out, tiny_qwen2_dir))
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [r["id"] for r in ROWS] and all(r["error"] is None for r in rows)
    return pairs, rows


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_kill_and_resume_equals_an_uninterrupted_run(sig, reference, tmp_path, tiny_qwen2_dir):
    pairs, want = reference
    out = tmp_path / "verdicts.jsonl"
    code, err = _interrupt(_judge(pairs, out, tiny_qwen2_dir), out, sig)
    kept = read_jsonl(out)
    assert 3 <= len(kept) < len(ROWS), f"the run was not interrupted mid-way: {len(kept)} rows, exit {code}: {err}"
    if sig == signal.SIGINT:  # the one-line message and nothing else (no asyncio tracebacks after it)
        assert code == 130 and [ln for ln in err.splitlines() if ln.strip()] == [
            f"rrm-engine: interrupted: {len(kept)} of {len(ROWS)} rows are in {out}; run the same command with "
            "--resume to finish"], err
    else:
        assert code == -signal.SIGKILL
    for row in kept:  # every row written before the kill is complete and final
        assert same(row, want[row["index"]])
    res = run_cli(*_judge(pairs, out, tiny_qwen2_dir, "--resume"))
    assert res.returncode == 0, res.stderr
    assert f"{len(kept)} of {len(ROWS)} rows already there" in res.stderr
    assert same(read_jsonl(out), want)


def test_resume_refuses_a_changed_input(reference, tmp_path, tiny_qwen2_dir):
    pairs, want = reference
    out = write_jsonl(tmp_path / "v.jsonl", want[:2])
    other = write_jsonl(tmp_path / "other.jsonl", [dict(r, id="z" + r["id"]) for r in ROWS])
    res = run_cli(*_judge(other, out, tiny_qwen2_dir, "--resume"), timeout=120)
    assert res.returncode == 2 and "was the input changed?" in res.stderr and "loading" not in res.stderr


def test_overwrite_keeps_the_old_file_until_the_run_completes(reference, tmp_path, tiny_qwen2_dir):
    """--overwrite writes beside --out: a run killed mid-way leaves the old file byte for byte;
    --resume --overwrite continues the killed run and only its completion replaces the file."""
    pairs, want = reference
    out = tmp_path / "verdicts.jsonl"
    old = '{"index": 0, "id": "results of an earlier run"}\n'
    out.write_text(old)
    partial = tmp_path / "verdicts.jsonl.partial"
    code, err = _interrupt(_judge(pairs, out, tiny_qwen2_dir, "--overwrite"), partial, signal.SIGKILL)
    kept = read_jsonl(partial)
    assert code == -signal.SIGKILL and 3 <= len(kept) < len(ROWS), (code, err)
    assert out.read_text() == old
    res = run_cli(*_judge(pairs, out, tiny_qwen2_dir, "--overwrite", "--resume"))
    assert res.returncode == 0, res.stderr
    assert f"resuming {partial}: {len(kept)} of {len(ROWS)} rows already there" in res.stderr
    assert same(read_jsonl(out), want) and not partial.exists()
