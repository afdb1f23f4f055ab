"""What the CLI checks and says before and while the model loads (issue 21, item 5): an input with
nothing to judge is an error, a truncated .gguf is refused before "converting it once", and a slow
first load names its step every few seconds instead of staying silent."""
from __future__ import annotations

import threading
import time

import pytest

from cli_helpers import write_jsonl
from rrm_engine.cli import main as cli
from rrm_engine.cli.main import main


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(cli.Judge, "from_pretrained", refuse)


def _one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command,content,message", [
    ("judge", "", "pairs.jsonl has no rows: nothing to judge"),
    ("judge", "\n\n", "pairs.jsonl has no rows: nothing to judge"),
    ("rank", "", "rank.jsonl has no rows: nothing to rank"),
    ("rewardbench", "", "rb.jsonl has no rows to judge"),
    ("pandalm", '[{"instruction": "i", "input": "", "response1": "a", "response2": "b", "annotator1": 0, '
                '"annotator2": 0, "annotator3": 0}]', "all 1 rows read are ties (label 0)"),
], ids=["judge", "judge-blank-lines", "rank", "eval-rewardbench", "eval-pandalm-all-ties"])
def test_an_input_with_nothing_to_judge_is_an_error(command, content, message, tmp_path, capsys, no_model_load):
    out = tmp_path / "o.jsonl"
    name = {"judge": "pairs.jsonl", "rank": "rank.jsonl", "rewardbench": "rb.jsonl", "pandalm": "p.json"}[command]
    f = tmp_path / name
    f.write_text(content)
    args = {"judge": ["judge", "--pairs", str(f), "--out", str(out)],
            "rank": ["rank", "--input", str(f), "--out", str(out)],
            "rewardbench": ["eval", "--rewardbench", str(f)], "pandalm": ["eval", "--pandalm", str(f)]}[command]
    assert main(args) == 2
    _one_line_error(capsys, message)
    assert not out.exists()


def test_a_truncated_gguf_is_refused_before_converting(embedded_path, tmp_path, capsys, no_model_load):
    """The header and tensor table are read while the arguments are parsed: the loader's own error, and
    no "converting it once" before it."""
    cut = tmp_path / "cut.gguf"
    with open(embedded_path, "rb") as f:
        cut.write_bytes(f.read(4 * 2**20))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"query": "q", "a": "x", "b": "y"}])
    with pytest.raises(SystemExit) as e:
        main(["judge", "--pairs", str(pairs), "--out", str(tmp_path / "o.jsonl"), "--model", str(cut)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"truncated GGUF file {cut}" in err and "converting" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_slow_load_names_its_step(tiny_qwen2_dir, capsys):
    """loading_progress prints the time so far and the step in progress, read from the loading thread's
    stack: here a real load of the tiny model, with a line every 0.05 s."""
    with cli.loading_progress(every=0.05):
        cli.Judge.from_pretrained(str(tiny_qwen2_dir), device="cpu", kv_cache_tokens=256)
        time.sleep(0.12)  # at least two lines, even when the load itself is quicker
    lines = capsys.readouterr().err.splitlines()
    beats = [ln for ln in lines if ln.startswith("rrm-engine: still loading (")]
    assert len(beats) >= 2
    steps = {what for _, _, what in cli.LOADING_STEPS} | {"loading"}
    assert all(ln.split("): ", 1)[1] in steps for ln in beats), beats


def test_the_cpp_build_and_the_gguf_conversion_are_named():
    """The two steps of a first run that take a minute each, named by where the thread is (code compiled
    under the file names of torch's JIT builder and of the GGUF converter)."""
    for filename, function, want in [("/x/torch/utils/cpp_extension.py", "load", "building the C++ CPU ops"),
                                     ("/x/rrm_engine/model/gguf_loader.py", "_write_tensors", "converting the .gguf"),
                                     ("/x/rrm_engine/model/gguf_loader.py", "_content_hash", "hashing the .gguf"),
                                     ("/x/rrm_engine/model/hf_loader.py", "load_hf", "reading the weights")]:
        inside, release = threading.Event(), threading.Event()
        code = compile(f"def {function}(inside, release):\n    inside.set()\n    release.wait(10)\n", filename, "exec")
        scope: dict = {}
        exec(code, scope)
        t = threading.Thread(target=scope[function], args=(inside, release))
        t.start()
        try:
            assert inside.wait(10)
            assert cli.loading_step(t.ident).startswith(want)
        finally:
            release.set()
            t.join()
