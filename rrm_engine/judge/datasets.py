"""Readers for pairwise evaluation data: PandaLM test set, RewardBench JSONL, plain JSONL.

Every reader returns PairExample rows: a query and two responses with a human label
(1: a is better, 2: b is better, 0: tie) and an optional subset name. Rows that cannot be read
raise ValueError naming the file, the row and the field.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

# RewardBench's sections and the subsets they contain (the leaderboard's grouping)
REWARDBENCH_SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}


@dataclass
class PairExample:
    query: str
    a: str
    b: str
    label: int  # 1: a better, 2: b better, 0: tie / unknown
    subset: str | None = None
    id: Any = None
    meta: dict = field(default_factory=dict)
    where: str = ""  # "FILE line N" / "FILE row N": where the row came from, for messages


@dataclass
class RankExample:
    query: str
    candidates: list[str]
    id: Any = None
    where: str = ""


def _field(row: dict, names: Iterable[str], where: str) -> Any:
    for n in names:
        if n in row:
            return row[n]
    raise ValueError(f"{where}: missing field (one of {', '.join(names)})")


def _str(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def pandalm_query(instruction: str, input_text: str) -> str:
    return instruction if not input_text.strip() else f"{instruction}\n\n{input_text}"


def majority_label(labels: list[int]) -> int:
    """Majority over annotators; no majority (all different) counts as a tie (0)."""
    (label, count), = Counter(labels).most_common(1)
    return label if count * 2 > len(labels) else 0


def _pandalm_text(value: Any, name: str, where: str) -> str:
    # a few PandaLM responses were stored as JSON booleans (the model answered "True"): keep their text
    if isinstance(value, (bool, int, float)):
        return str(value)
    return _str(value, name, where)


def read_pandalm(path: str | Path) -> list[PairExample]:
    """The PandaLM test set as published (data/testset-v1.json of WeOpenML/PandaLM): one JSON list."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            hint = ("; it looks like JSONL (one object per line): PandaLM's test set is one JSON list, "
                    "other JSONL pairs go to `eval --rewardbench` or `judge --pairs`")
        raise ValueError(f"{path} is not a PandaLM JSON file: {e.msg} at line {e.lineno} column {e.colno}{hint}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows (the PandaLM test-set format), got {type(rows).__name__}")
    out = []
    for n, row in enumerate(rows):
        where = f"{path} row {n}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        labels = [row.get(f"annotator{k}") for k in (1, 2, 3)]
        if any(lab not in (0, 1, 2) for lab in labels):
            raise ValueError(f"{where}: annotator labels must be 0, 1 or 2, got {labels}")
        query = pandalm_query(_str(row.get("instruction"), "instruction", where), _str(row.get("input", ""), "input", where))
        out.append(PairExample(query, _pandalm_text(row.get("response1"), "response1", where),
                               _pandalm_text(row.get("response2"), "response2", where), majority_label(labels),
                               subset=row.get("motivation_app"), id=row.get("idx", n),
                               meta={"cmp_key": row.get("cmp_key"), "annotators": labels}, where=where))
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: str | Path) -> list[tuple[int, dict]]:
    """(line number from 1, object) for every non-blank line; the first bad line raises ValueError."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    hint = " (a JSON list, e.g. a PandaLM file, goes to `eval --pandalm`)" if n == 0 and line.lstrip().startswith("[") else ""
                    raise ValueError(f"{path} line {n + 1}: invalid JSON ({e.msg}){hint}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path} line {n + 1}: expected a JSON object, got {type(row).__name__}")
                rows.append((n + 1, row))
    return rows


def read_rewardbench(path: str | Path) -> list[PairExample]:
    """RewardBench rows {prompt, chosen, rejected, subset}: a = chosen, label 1."""
    out = []
    for n, (line, row) in enumerate(read_jsonl_numbered(path)):
        where = f"{path} line {line}"
        out.append(PairExample(_str(_field(row, ("prompt",), where), "prompt", where),
                               _str(_field(row, ("chosen",), where), "chosen", where),
                               _str(_field(row, ("rejected",), where), "rejected", where), 1,
                               subset=row.get("subset"), id=row.get("id", n), where=where))
    return out


def read_pairs(path: str | Path) -> list[PairExample]:
    """Plain pairs {query|prompt|question, a|response1|response_a, b|response2|response_b, [label]}."""
    out = []
    for n, (line, row) in enumerate(read_jsonl_numbered(path)):
        where = f"{path} line {line}"
        label = row.get("label", 0)
        if label not in (0, 1, 2):
            raise ValueError(f"{where}: label must be 0, 1 or 2, got {label!r}")
        out.append(PairExample(_str(_field(row, ("query", "prompt", "question"), where), "query", where),
                               _str(_field(row, ("a", "response1", "response_a"), where), "a", where),
                               _str(_field(row, ("b", "response2", "response_b"), where), "b", where),
                               label, subset=row.get("subset"), id=row.get("id", n), where=where))
    return out


def read_rank_items(path: str | Path) -> list[tuple[Any, str, list[str]]]:
    """Rows {query|prompt, candidates|responses: [str, ...], [id]} -> (id, query, candidates)."""
    return [(r.id, r.query, r.candidates) for r in read_rank_rows(path)]


def read_rank_rows(path: str | Path) -> list[RankExample]:
    out = []
    for n, (line, row) in enumerate(read_jsonl_numbered(path)):
        where = f"{path} line {line}"
        query = _str(_field(row, ("query", "prompt", "question"), where), "query", where)
        cands = _field(row, ("candidates", "responses"), where)
        if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
            raise ValueError(f"{where}: candidates must be a list of strings")
        out.append(RankExample(query, cands, row.get("id", n), where))
    return out


def section_scores(correct: dict[str, int], total: dict[str, int]) -> dict[str, float]:
    """RewardBench section accuracies from per-subset counts: example-weighted within a section, except
    Reasoning, where math-prm and the code (hep-*) subsets weigh half each, as RewardBench does."""
    out = {}
    for section, subsets in REWARDBENCH_SECTIONS.items():
        present = [s for s in subsets if total.get(s)]
        if not present:
            continue
        if section == "Reasoning":
            parts = []
            for group in (["math-prm"], [s for s in present if s.startswith("hep-")]):
                n = sum(total.get(s, 0) for s in group)
                if n:
                    parts.append(sum(correct.get(s, 0) for s in group) / n)
            out[section] = sum(parts) / len(parts)
        else:
            out[section] = sum(correct.get(s, 0) for s in present) / sum(total[s] for s in present)
    return out
