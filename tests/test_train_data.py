"""Training data: JSONL pairs and PandaLM, shuffled deterministically, resumable, strict on bad rows."""
import json
from pathlib import Path

import pytest

from rrm_engine.train.data import DataError, PairStream, PreferencePair, pandalm_pairs

PANDALM = Path(__file__).resolve().parents[2] / "shared" / "data" / "pandalm_testset_v1.json"


def _write_jsonl(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n")
            if i == 2:
                f.write("\n")  # blank lines are skipped
    return path


def test_jsonl_stream_is_a_seeded_permutation_per_epoch(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", 7)
    s = PairStream(path, seed=3)
    assert len(s) == 7
    epoch0 = [p.prompt for p in s.take(7)]
    epoch1 = [p.prompt for p in s.take(7)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"q{i}" for i in range(7))
    assert epoch0 != epoch1  # a fresh permutation each epoch (fixed by the seed, checked here)
    again = PairStream(path, seed=3)
    assert [p.prompt for p in again.take(14)] == epoch0 + epoch1
    other = PairStream(path, seed=4)
    assert [p.prompt for p in other.take(7)] != epoch0


def test_stream_resumes_from_its_state(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", 5)
    full = PairStream(path, seed=1)
    want = full.take(12)
    s = PairStream(path, seed=1)
    s.take(8)  # crosses an epoch boundary
    state = s.state_dict()
    resumed = PairStream(path, seed=1)
    resumed.load_state_dict(state)
    assert resumed.take(4) == want[8:]
    with pytest.raises(DataError, match="seed"):
        PairStream(path, seed=2).load_state_dict(state)


@pytest.mark.parametrize("line, msg", [
    ('{"prompt": "q", "chosen": "a"}', "missing field"),
    ('{"prompt": "q", "chosen": "a", "rejected": ["x"]}', "rejected"),
    ('{"prompt": "q", "chosen": "a", "rejected": "a"}', "identical"),
    ('{"prompt": "q", "chosen": "a", ', "invalid JSON"),
    ('[1, 2]', "JSON object"),
])
def test_bad_jsonl_rows_name_file_and_line(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + line + "\n")
    s = PairStream(path, seed=0)
    with pytest.raises(DataError, match=msg) as e:
        s.take(2)
    assert "bad.jsonl:2" in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        PairStream(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable"):
        PairStream(tmp_path / "empty.jsonl")


def test_pandalm_majority_labels_and_ties():
    row = dict(instruction="Fix this", input="teh cat", response1="the cat", response2="teh cat")
    rows = [dict(row, annotator1=1, annotator2=1, annotator3=2),
            dict(row, input="", annotator1=2, annotator2=0, annotator3=2),
            dict(row, annotator1=0, annotator2=0, annotator3=1),  # tie by majority: skipped
            dict(row, annotator1=0, annotator2=1, annotator3=2)]  # no majority: skipped
    pairs = pandalm_pairs(rows)
    assert pairs == [PreferencePair("Fix this\nteh cat", "the cat", "teh cat"),
                     PreferencePair("Fix this", "teh cat", "the cat")]
    with pytest.raises(DataError, match="row 0"):
        pandalm_pairs([{"instruction": "x"}])


@pytest.mark.skipif(not PANDALM.is_file(), reason=f"PandaLM test set not found at {PANDALM}")
def test_pandalm_file_skips_the_105_ties():
    s = PairStream(PANDALM, seed=0)
    assert s.fmt == "pandalm" and len(s) == 999 - 105
    assert all(isinstance(p.chosen, str) and p.chosen != p.rejected for p in s.take(20))
