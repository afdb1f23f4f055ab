"""The README's command-line examples, as written: each one parses and names files that exist
(default suite), and each one runs to exit code 0 on the embedded model (slow: about a minute each
on a CPU; .ci/run runs them). `rrm-engine` is the console script, i.e. `python -m rrm_engine`
(test_cli.py checks that they are the same); here it is run as the module so that the subprocess
uses this checkout whatever is installed."""
from __future__ import annotations

import re
import shlex
import sys

import pytest

from cli_helpers import REPO, cli_env
from rrm_engine.cli.main import build_parser

README = REPO / "README.md"


def readme_cli_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Command line"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.startswith("rrm-engine ")]


COMMANDS = readme_cli_commands()
IDS = ["-".join(c.split()[1:3]).replace("--", "") for c in COMMANDS]  # judge-pairs, eval-pandalm, ...


def test_readme_lists_every_command():
    assert sorted({c.split()[1] for c in COMMANDS}) == ["demo", "eval", "judge", "rank", "train"]
    quick_start = README.read_text().split("## Quick start", 1)[1].split("```", 2)[1]
    assert "python -m rrm_engine demo" in quick_start  # .ci/run runs the quick start as written


@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_readme_example_parses(command, monkeypatch):
    monkeypatch.chdir(REPO)
    build_parser().parse_args(shlex.split(command)[1:])  # types check every number and input path


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_readme_example_runs(command, tmp_path, embedded_path):
    import subprocess
    (tmp_path / "docs").symlink_to(REPO / "docs")  # the paths as written, outputs in a scratch dir
    args = [sys.executable, "-m", "rrm_engine", *shlex.split(command)[1:]]
    out = subprocess.run(args, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    if " --out " in f" {command} ":
        target = tmp_path / shlex.split(command)[shlex.split(command).index("--out") + 1]
        assert target.exists()
