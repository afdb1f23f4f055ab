"""A results file that survives interruption and is never lost or mixed: JSONL, one row per finished item.

Each row is appended and flushed the moment its item finishes, so Ctrl-C, a crash or a kill loses
at most the items still running. Every row carries `index`, the item's position in the input, `id`,
and `settings`, the run settings that decide its verdict (model, weights, votes, max tokens, ...;
cli.py says which). With resume=True the rows already there are kept and their items skipped, rows
that failed (`error` set) are dropped so that they run again, and a last line cut short by a kill
is discarded; `check_settings` refuses to continue a file whose rows were written with other
settings (naming the differences), so one file never mixes two runs' verdicts.

Replacing an existing file (replace=True, the CLI's --overwrite) never touches it before the new
run has finished: the new rows go to `<name>.partial` beside it, which is renamed over the file
only when every item has a row. A failed load, a crash or a kill leaves the old file as it was
(and the partial rows, which `replace=True, resume=True` continues).

Nothing is written before the first row: a run that fails before it (a model that does not load)
changes no file. When a run completes, the file is rewritten in input order (atomically: a temp
file renamed over it).

Problems that would only show after the work (a missing directory, a read-only location, an
existing file that would be overwritten) are found by `check_output`, before any model is loaded.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class ResultsFileError(ValueError):
    pass


def partial_path(path: Path) -> Path:
    """Where a run that replaces `path` writes its rows until it completes."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


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


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


class ResultsFile:
    def __init__(self, path: Path, resume: bool = False, replace: bool = False):
        """path: the results file. resume: keep its finished rows (self.done). replace: the rows go to
        partial_path(path) until close(complete=True) renames it over path (resume then continues
        the partial file, the interrupted replacement)."""
        self.path = Path(path)
        self.work = partial_path(self.path) if replace else self.path  # the file rows are appended to
        self._lines: dict[int, int] = {}  # index -> line number in the previous file, for messages
        self.done: dict[int, dict] = self._previous_rows() if resume else {}
        self._f = None  # opened at the first row: a run that fails before it changes no file

    def _previous_rows(self) -> dict[int, dict]:
        if not self.work.exists():
            return {}
        lines = self.work.read_text(encoding="utf-8").split("\n")
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
                raise ResultsFileError(f"cannot resume {self.work}: line {n} is not JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("index"), int):
                raise ResultsFileError(f"cannot resume {self.work}: line {n} has no integer 'index' "
                                       "(not written by this command?)")
            if row.get("error") is None:  # failed rows are dropped: they run again
                rows[row["index"]] = row
                self._lines[row["index"]] = n
        return rows

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse to continue rows written with other settings. Only the keys given are compared (the
        CLI checks what it knows before the model loads, the rest once it has loaded); a kept row
        without recorded settings (an older rrm-engine's) is refused too."""
        for index, row in sorted(self.done.items()):
            where = f"cannot resume {self.work}: line {self._lines[index]}"
            theirs = row.get("settings")
            if not isinstance(theirs, dict):
                raise ResultsFileError(f"{where} records no run settings (written by an older rrm-engine, whose rows "
                                       "numbered the winner 0/1); run again with --overwrite")
            diff = [f"{k} {_show(theirs.get(k))} in the file, {_show(v)} now"
                    for k, v in settings.items() if theirs.get(k) != v]
            if diff:
                raise ResultsFileError(f"{where} was judged with other settings ({'; '.join(diff)}); resume with the "
                                       "file's settings, or run with --overwrite to replace it (the file stays as it "
                                       "is until the new run completes)")

    def _rewrite(self, target: Path, rows: list[dict]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a results file is an ordinary file
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write(self, row: dict[str, Any]) -> None:
        """Append one finished row and push it to the OS (a killed process loses nothing written).
        The first write starts the file over with the kept rows (failed ones and a torn line gone)."""
        if self._f is None:
            self._rewrite(self.work, self.rows())
            self._f = open(self.work, "a", encoding="utf-8")
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        self.done[row["index"]] = row

    def rows(self) -> list[dict]:
        return sorted(self.done.values(), key=lambda r: r["index"])

    def close(self, complete: bool) -> None:
        """complete: every item has a row; the file is written in input order (and a replacement's
        partial file takes the old file's place). Incomplete: the rows written so far stay where they
        are, and a file being replaced is untouched."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if complete:
            self._rewrite(self.path, self.rows())
            if self.work != self.path and self.work.exists():
                self.work.unlink()
