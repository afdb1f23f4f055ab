"""The import rules of docs/DESIGN.md as code: import-linter's contracts (pyproject.toml,
[tool.importlinter]) and no import circle between modules, counting imports inside functions and
under TYPE_CHECKING too (a circle hidden in a function is still a circle)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
grimp = pytest.importorskip("grimp", reason="import-linter (the test extra) is not installed")


def test_import_linter_contracts_are_kept():
    result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def import_circles(graph) -> list[list[str]]:
    """Strongly connected groups of modules (Tarjan), ignoring a package's imports of its own
    submodules and of its ancestors' __init__ (re-exports of a public API, not circles of logic)."""
    mods = sorted(graph.modules)
    adj = {m: {b for b in graph.find_modules_directly_imported_by(m)
               if not b.startswith(m + ".") and not m.startswith(b + ".")} for m in mods}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(mods)))
    for m in mods:
        if m not in index:
            visit(m)
    return found


def test_no_import_circles():
    assert import_circles(grimp.build_graph("rrm_engine", "rrm_kernels")) == []


def test_the_circle_finder_finds_a_circle(tmp_path, monkeypatch):
    pkg = tmp_path / "circ_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")  # inside a function: still a circle
    (pkg / "b.py").write_text("from .a import f\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_circles(grimp.build_graph("circ_pkg")) == [["circ_pkg.a", "circ_pkg.b"]]


def test_modules_directly_in_the_package_are_few():
    """The public API and a few process-wide settings sit at the top; everything else in a room."""
    top = sorted(p.name for p in (ROOT / "rrm_engine").glob("*.py"))
    assert len(top) <= 12, top
