"""Preference pairs for GRPO: JSONL {prompt, chosen, rejected} or the PandaLM test-set format.

PairStream yields pairs forever, epoch after epoch, each epoch in a fresh permutation drawn from
(seed, epoch) alone, so the order is deterministic and a run can resume from (epoch, index).
JSONL is streamed: only the byte offset of each line is kept and a line is parsed when its pair
is drawn (a bad line raises, naming file and line, before its batch is built).
PandaLM files are one JSON array (about 1000 rows), so they are read whole.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


class DataError(ValueError):
    """Malformed training data; the message names the file and the row."""


def _pair_from_record(rec: Any, where: str) -> PreferencePair:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object with prompt/chosen/rejected, got {type(rec).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    for k in ("prompt", "chosen", "rejected"):
        if not isinstance(rec[k], str):
            raise DataError(f"{where}: field {k!r} must be a string (multi-turn conversations are not "
                            f"supported by the RRM prompt), got {type(rec[k]).__name__}")
    if rec["chosen"] == rec["rejected"]:
        raise DataError(f"{where}: chosen and rejected are identical")
    return PreferencePair(rec["prompt"], rec["chosen"], rec["rejected"])


def pandalm_pairs(rows: list[dict[str, Any]], where: str = "pandalm") -> list[PreferencePair]:
    """PandaLM rows -> pairs by the annotators' majority label (1 or 2); ties (0) and rows
    without a majority are skipped. The query is the instruction, then the input if any."""
    pairs = []
    for i, row in enumerate(rows):
        try:
            votes = [row["annotator1"], row["annotator2"], row["annotator3"]]
            instruction, inp, r1, r2 = row["instruction"], row.get("input", ""), row["response1"], row["response2"]
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: row {i} is not a PandaLM row (missing {e})") from None
        label, count = Counter(votes).most_common(1)[0]
        if count < 2 or label not in (1, 2):
            continue
        query = f"{instruction}\n{inp}" if inp else instruction
        chosen, rejected = (r1, r2) if label == 1 else (r2, r1)
        pairs.append(PreferencePair(query, chosen, rejected))
    return pairs


def _looks_like_pandalm(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


class PairStream:
    """Deterministic, shuffled, endless stream of PreferencePairs from one file."""

    def __init__(self, path: str | Path, seed: int = 0, fmt: str = "auto"):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"data file not found: {self.path}")
        if fmt == "auto":
            fmt = "pandalm" if _looks_like_pandalm(self.path) else "jsonl"
        if fmt not in ("jsonl", "pandalm"):
            raise DataError(f"unknown data format {fmt!r} (use 'jsonl' or 'pandalm')")
        self.fmt, self.seed = fmt, seed
        self._pairs: list[PreferencePair] | None = None
        self._offsets: list[tuple[int, int]] = []  # (byte offset, line number) of each JSONL record
        if fmt == "pandalm":
            with open(self.path, encoding="utf-8") as f:
                rows = json.load(f)
            if not isinstance(rows, list):
                raise DataError(f"{self.path}: a PandaLM file is a JSON array of rows")
            self._pairs = pandalm_pairs(rows, str(self.path))
        else:
            self._index_lines()
        if len(self) == 0:
            raise DataError(f"{self.path}: no usable preference pairs")
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _index_lines(self) -> None:
        offset = 0
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    self._offsets.append((offset, lineno))
                offset += len(line)

    def __len__(self) -> int:
        return len(self._pairs) if self._pairs is not None else len(self._offsets)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g).tolist()

    def _read(self, i: int) -> PreferencePair:
        if self._pairs is not None:
            return self._pairs[i]
        offset, lineno = self._offsets[i]
        with open(self.path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        where = f"{self.path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg})") from None
        return _pair_from_record(rec, where)

    def check(self) -> None:
        """Read every record once, so that a bad line fails now (naming file and line), not at the
        step that draws it."""
        for i in range(len(self)):
            self._read(i)

    def __iter__(self) -> Iterator[PreferencePair]:
        while True:
            yield self.next()

    def next(self) -> PreferencePair:
        if self.index == len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        pair = self._read(self._order[self.index])
        self.index += 1
        return pair

    def take(self, n: int) -> list[PreferencePair]:
        return [self.next() for _ in range(n)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "size": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["size"] != len(self):
            raise DataError(f"data position was saved for seed={state['seed']}, {state['size']} pairs; "
                            f"this stream has seed={self.seed}, {len(self)} pairs")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)
