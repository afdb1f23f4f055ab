"""A results file that survives interruption: JSONL, one row per finished item, written at once.

Each row is appended and flushed the moment its item finishes, so Ctrl-C, a crash or a kill loses
at most the items still running. Every row carries `index`, the item's position in the input, and
`id`; with resume=True the rows already there are kept and their items skipped, rows that failed
(`error` set) are dropped so that they run again, and a last line cut short by a kill is discarded.
When a run completes, the file is rewritten in input order (atomically: a temp file renamed over it).

Problems that would only show after the work (a missing directory, a read-only location, an
existing file that would be overwritten) are found by `check`, before any model is loaded.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class ResultsFileError(ValueError):
    pass


def check_output(path: Path, resume: bool, overwrite: bool) -> None:
    """Fail now, not after the judging: the directory is created (or must be writable) and an
    existing non-empty file is only reused with resume or replaced with overwrite."""
    if path.is_dir():
        raise ResultsFileError(f"--out {path} is a directory; give a file name such as {path / 'results.jsonl'}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResultsFileError(f"cannot create the directory of --out {path}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK):
        raise ResultsFileError(f"cannot write --out {path}: the directory {parent} is not writable")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ResultsFileError(f"cannot write --out {path}: the file is read-only")
        if path.stat().st_size > 0 and not (resume or overwrite):
            raise ResultsFileError(f"--out {path} already exists; pass --resume to continue it "
                                   "(its finished rows are kept) or --overwrite to replace it")


class ResultsFile:
    def __init__(self, path: Path, resume: bool):
        self.path = Path(path)
        self.done: dict[int, dict] = self._previous_rows() if resume else {}
        self._rewrite(sorted(self.done.values(), key=lambda r: r["index"]))
        self._f = open(self.path, "a", encoding="utf-8")

    def _previous_rows(self) -> dict[int, dict]:
        if not self.path.exists():
            return {}
        lines = self.path.read_text(encoding="utf-8").split("\n")
        ends_cleanly = lines[-1] == ""
        rows: dict[int, dict] = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines) and not ends_cleanly:
                    break  # the last row was being written when the run was killed: it runs again
                raise ResultsFileError(f"cannot resume {self.path}: line {n} is not JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("index"), int):
                raise ResultsFileError(f"cannot resume {self.path}: line {n} has no integer 'index' "
                                       "(not written by this command?)")
            if row.get("error") is None:  # failed rows are dropped: they run again
                rows[row["index"]] = row
        return rows

    def _rewrite(self, rows: list[dict]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a results file is an ordinary file
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write(self, row: dict[str, Any]) -> None:
        """Append one finished row and push it to the OS (a killed process loses nothing written)."""
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        self.done[row["index"]] = row

    def rows(self) -> list[dict]:
        return sorted(self.done.values(), key=lambda r: r["index"])

    def close(self, complete: bool) -> None:
        """complete: every item has a row; the file is rewritten in input order."""
        self._f.close()
        if complete:
            self._rewrite(self.rows())
