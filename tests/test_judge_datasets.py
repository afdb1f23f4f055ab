"""Dataset readers: the real PandaLM file (when present) and small synthetic JSONL files."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rrm_engine.judge.datasets import (majority_label, read_pairs, read_pandalm, read_rank_items, read_rewardbench,
                                       section_scores)

PANDALM = Path(__file__).resolve().parents[2] / "shared" / "data" / "pandalm_testset_v1.json"


def test_pandalm_rows_parse():
    if not PANDALM.exists():
        pytest.skip(f"PandaLM test set not found at {PANDALM} (see shared/data/README.md)")
    rows = read_pandalm(PANDALM)
    assert len(rows) == 999
    assert Counter(r.label for r in rows) == {1: 422, 2: 472, 0: 105}  # the README's majority counts
    raw = json.loads(PANDALM.read_text())
    for r, x in zip(rows, raw):
        assert r.id == x["idx"]
        assert r.query == (x["instruction"] if not x["input"].strip() else x["instruction"] + "\n\n" + x["input"])
        assert isinstance(r.a, str) and isinstance(r.b, str)
    assert rows[157].a == "True"  # stored as a JSON boolean in the file


def test_majority_label():
    assert majority_label([1, 1, 2]) == 1
    assert majority_label([0, 2, 2]) == 2
    assert majority_label([0, 1, 2]) == 0


def _jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in rows) + "\n")
    return path


def test_rewardbench_and_sections(tmp_path):
    f = _jsonl(tmp_path / "rb.jsonl", [
        {"prompt": "p", "chosen": "c", "rejected": "r", "subset": "alpacaeval-easy"},
        {"prompt": "p2", "chosen": "c2", "rejected": "r2", "subset": "math-prm", "id": 7},
    ])
    rows = read_rewardbench(f)
    assert [(r.query, r.a, r.b, r.label, r.subset) for r in rows] == [
        ("p", "c", "r", 1, "alpacaeval-easy"), ("p2", "c2", "r2", 1, "math-prm")]
    assert rows[1].id == 7
    correct = {"alpacaeval-easy": 3, "mt-bench-hard": 1, "math-prm": 1, "hep-go": 2, "hep-js": 0}
    total = {"alpacaeval-easy": 4, "mt-bench-hard": 2, "math-prm": 4, "hep-go": 2, "hep-js": 2}
    s = section_scores(correct, total)
    assert s["Chat"] == 0.75 and s["Chat Hard"] == 0.5
    assert s["Reasoning"] == pytest.approx((1 / 4 + 2 / 4) / 2)  # math and code weigh half each
    assert "Safety" not in s


def test_pairs_and_rank_readers(tmp_path):
    rows = read_pairs(_jsonl(tmp_path / "p.jsonl", [{"query": "q", "a": "x", "b": "y", "label": 2},
                                                   {"prompt": "q2", "response1": "x", "response2": "y"}]))
    assert [(r.query, r.label) for r in rows] == [("q", 2), ("q2", 0)]
    items = read_rank_items(_jsonl(tmp_path / "r.jsonl", [{"query": "q", "candidates": ["a", "b"], "id": "k"}]))
    assert items == [("k", "q", ["a", "b"])]


def test_reader_errors_name_the_row(tmp_path):
    with pytest.raises(ValueError, match="line 2: missing field"):
        read_pairs(_jsonl(tmp_path / "a.jsonl", [{"query": "q", "a": "x", "b": "y"}, {"query": "q", "a": "x"}]))
    with pytest.raises(ValueError, match="line 1: invalid JSON"):
        read_pairs(_jsonl(tmp_path / "b.jsonl", ["{not json"]))
    with pytest.raises(ValueError, match="label must be"):
        read_pairs(_jsonl(tmp_path / "c.jsonl", [{"query": "q", "a": "x", "b": "y", "label": 3}]))
    with pytest.raises(ValueError, match="candidates must be a list"):
        read_rank_items(_jsonl(tmp_path / "d.jsonl", [{"query": "q", "candidates": "ab"}]))
    with pytest.raises(ValueError, match="'a' must be a string"):
        read_pairs(_jsonl(tmp_path / "e.jsonl", [{"query": "q", "a": 1, "b": "y"}]))
