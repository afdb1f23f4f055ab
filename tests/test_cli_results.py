"""The CLI never loses or mixes results (issue 21, item 5), in-process on the tiny model:
--overwrite leaves the old --out as it was when the run fails; --resume refuses a file judged with
other settings, naming the differences; the rows number the two sides one way (1/2) everywhere."""
from __future__ import annotations

import json
import shutil

import pytest

from cli_helpers import read_jsonl, write_jsonl
from rrm_engine.cli import main as cli
from rrm_engine.cli.main import main
from rrm_engine.judge.results import Comparison
from rrm_engine.cli.results_file import ResultsFile

ROWS = [{"id": f"q{i}", "query": f"Which number is larger, {i} or {i + 7}?", "a": str(i), "b": str(i + 7),
         "label": 2 - i % 2} for i in range(4)]
RUN = ["--votes", "3", "--max-tokens", "2", "--quiet", "--device", "cpu", "--dtype", "float32"]


def _judge(pairs, out, model, *extra) -> list[str]:
    return ["judge", "--pairs", str(pairs), "--out", str(out), "--model", str(model), *extra]


@pytest.fixture(scope="module")
def judged(tmp_path_factory, tiny_qwen2_dir):
    """(pairs file, results file, its rows) of a complete run with RUN."""
    tmp = tmp_path_factory.mktemp("judged")
    pairs = write_jsonl(tmp / "pairs.jsonl", ROWS)
    out = tmp / "verdicts.jsonl"
    assert main(_judge(pairs, out, tiny_qwen2_dir, *RUN)) == 0
    return pairs, out, read_jsonl(out)


def test_rows_number_the_sides_one_way(judged, capsys):
    """verdict, label and every vote's verdict are 1 (a) / 2 (b): `label == verdict` is a right verdict,
    and no 0/1 `winner` sits beside a 1/2 `label` to be misread."""
    _, _, rows = judged
    assert len(rows) == len(ROWS)
    for row, given in zip(rows, ROWS):
        assert "winner" not in row and row["label"] == given["label"]
        a, b = row["counts"]
        assert row["verdict"] == (1 if a > b else 2 if b > a else None)
        assert len(row["votes"]) == 3 and all(v["verdict"] in (1, 2, None) for v in row["votes"])
        assert [sum(v["verdict"] == side for v in row["votes"]) for side in (1, 2)] == [a, b]
    # the Python API keeps winner 0/1 (DESIGN.md) and says the rows' numbering as Comparison.verdict
    assert [Comparison(w, [], (0, 0), None, 0).verdict for w in (0, 1, None)] == [1, 2, None]


def test_accuracy_reads_the_same_numbering(judged, tiny_qwen2_dir, tmp_path, capsys):
    pairs, out, rows = judged
    again = tmp_path / "again.jsonl"
    shutil.copy(out, again)
    capsys.readouterr()
    assert main(_judge(pairs, again, tiny_qwen2_dir, *RUN, "--resume")) == 0  # nothing to run: the summary only
    accuracy = sum(r["verdict"] == r["label"] for r in rows) / len(rows)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "accuracy (labelled)" in ln)
    assert f"{accuracy:.3f}" in line


def test_every_row_records_its_settings(judged, tiny_qwen2_dir):
    _, _, rows = judged
    want = {"model": str(tiny_qwen2_dir.resolve()), "weights": "fp32", "votes": 3, "max_tokens": 2,
            "thinking_budget": None, "temperature": 0.6, "top_p": 1.0, "swap": "random", "strict": False,
            "adaptive": False, "seed": 0, "method": None}
    assert all(r["settings"] == want for r in rows)
    assert list(want) == list(cli.RUN_SETTINGS)


def test_resume_with_other_settings_is_refused_before_the_load(judged, tiny_qwen2_dir, tmp_path, capsys, monkeypatch):
    """The issue's case: --votes 3 interrupted, resumed with --votes 1 --temperature 0; the differences
    are named and nothing is loaded, run or written."""
    pairs, out, rows = judged
    unfinished = write_jsonl(tmp_path / "v.jsonl", rows[:2])
    before = unfinished.read_bytes()
    monkeypatch.setattr(cli.Judge, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    other = [a for a in RUN if a not in ("--votes", "3")] + ["--votes", "1", "--temperature", "0"]
    assert main(_judge(pairs, unfinished, tiny_qwen2_dir, *other, "--resume")) == 2
    err = capsys.readouterr().err
    assert "line 1 was judged with other settings (votes 3 in the file, 1 now; temperature 0.6 in the file, " \
           "0.0 now)" in err and len(err.strip().splitlines()) == 1, err
    assert unfinished.read_bytes() == before


def test_resume_checks_the_model_defaults_once_loaded(judged, tiny_qwen2_dir, tmp_path, capsys):
    """max_tokens left to the model's default is known after the load: a file judged with
    --max-tokens 2 is refused then, before any item runs; the same settings resume and finish."""
    pairs, out, rows = judged
    unfinished = write_jsonl(tmp_path / "v.jsonl", rows[:2])
    before = unfinished.read_bytes()
    assert main(_judge(pairs, unfinished, tiny_qwen2_dir, *[a for a in RUN if a not in ("--max-tokens", "2")],
                       "--resume")) == 2
    err = capsys.readouterr().err
    assert "max_tokens 2 in the file, 8192 now" in err, err
    assert unfinished.read_bytes() == before
    assert main(_judge(pairs, unfinished, tiny_qwen2_dir, *RUN, "--resume")) == 0
    assert "2 of 4 rows already there, 2 to run" in capsys.readouterr().err
    assert [r["id"] for r in read_jsonl(unfinished)] == [r["id"] for r in ROWS]


def test_resume_refuses_rows_without_settings(tmp_path):
    """A file of an older rrm-engine (winner 0/1, no settings) cannot be continued: it would mix numberings."""
    f = write_jsonl(tmp_path / "old.jsonl", [{"index": 0, "id": "a", "winner": 1, "label": 2, "error": None}])
    r = ResultsFile(f, resume=True)
    with pytest.raises(ValueError, match="line 1 records no run settings.*--overwrite"):
        r.check_settings({"votes": 1})


def test_overwrite_keeps_the_old_file_when_the_load_fails(judged, tiny_qwen2_dir, tmp_path, capsys):
    """The issue's case: --overwrite with a model that fails to load (a truncated checkpoint) exits 2
    and the previous results are there, byte for byte; no partial file is left."""
    pairs, out, _ = judged
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen2_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    previous = tmp_path / "previous.jsonl"
    shutil.copy(out, previous)
    before = previous.read_bytes()
    assert main(_judge(pairs, previous, broken, *RUN, "--overwrite")) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert previous.read_bytes() == before and not (tmp_path / "previous.jsonl.partial").exists()


def test_overwrite_replaces_the_file_when_the_run_completes(judged, tiny_qwen2_dir, tmp_path):
    pairs, _, rows = judged
    previous = write_jsonl(tmp_path / "previous.jsonl", ['{"index": 0, "id": "old"}'])
    assert main(_judge(pairs, previous, tiny_qwen2_dir, *RUN, "--overwrite")) == 0
    got = read_jsonl(previous)
    assert [r["id"] for r in got] == [r["id"] for r in rows] and [r["verdict"] for r in got] == \
        [r["verdict"] for r in rows]
    assert not (tmp_path / "previous.jsonl.partial").exists()


def test_a_failed_run_writes_no_file(tmp_path):
    """Nothing is written before the first row: a new --out is not created by a run that never gets there."""
    f = tmp_path / "new.jsonl"
    r = ResultsFile(f)
    r.close(complete=False)
    assert not f.exists()
    r = ResultsFile(f, replace=True)
    r.write({"index": 0, "id": "a", "error": None})
    r.close(complete=False)
    assert not f.exists() and json.loads((tmp_path / "new.jsonl.partial").read_text())["id"] == "a"
