"""The command line: the real CLI in a subprocess on the tiny model (each run loads it once) for the
paths a user walks, and in-process for the table of argument checks (which must never get as far
as loading a model)."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from cli_helpers import LOADING, REPO, cli_env, read_jsonl, run_cli, write_jsonl
from rrm_engine.cli import main as cli
from rrm_engine.cli.main import build_parser, main

PANDALM = REPO.parent / "shared" / "data" / "pandalm_testset_v1.json"
EXAMPLES = REPO / "docs" / "examples"
FAST = ["--max-tokens", "1", "--quiet", "--device", "cpu", "--dtype", "float32"]
PAIRS = [{"query": "2+2?", "a": "4", "b": "5", "label": 1, "id": "x"},
         {"query": "Capital of Italy?", "a": "Rome", "b": "Milan {b}"}]


@pytest.fixture
def no_model_load(monkeypatch):
    """In-process: fail the test if anything tries to load a model."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(cli.Judge, "from_pretrained", refuse)


# --- entry points -----------------------------------------------------------------------------------
def test_help_and_console_script():
    out = run_cli("--help", timeout=120)
    assert out.returncode == 0 and all(c in out.stdout for c in ("judge", "rank", "eval", "demo", "train"))
    # the `rrm-engine` script pip installs: pyproject names a function that runs main() and exits with its code
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["rrm-engine"].partition(":")
    code = f"import sys; sys.argv = ['rrm-engine', 'rank', '--help']; from {module} import {func}; {func}()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert out.returncode == 0 and "usage: rrm-engine rank" in out.stdout


def test_parser_tables_and_plugins():
    p = build_parser()
    a = p.parse_args(["judge", "--pairs", str(EXAMPLES / "pairs.jsonl"), "--out", "o.jsonl", "--votes", "3"])
    assert a.votes == 3 and a.model == "embedded" and a.swap == "random" and a.max_tokens is None
    assert cli.llm_kwargs(a) == {"model": "embedded"}  # options not given are not passed: the engine decides
    a = p.parse_args(["judge", "--pairs", str(EXAMPLES / "pairs.jsonl"), "--out", "o.jsonl", "--dtype", "bf16",
                      "--kv-cache-tokens", "4096"])
    assert cli.llm_kwargs(a) == {"model": "embedded", "dtype": "bf16", "kv_cache_tokens": 4096}
    # every judging command takes every engine option: adding one to LLM_OPTIONS is the whole change
    for command in ("judge", "rank", "eval", "demo"):
        sub = p._subparsers._group_actions[0].choices[command]
        for o in cli.LLM_OPTIONS + cli.JUDGE_OPTIONS:
            assert o.flags[0] in sub._option_string_actions, (command, o.flags[0])
    train = p._subparsers._group_actions[0].choices["train"]
    assert "--debug" in train._option_string_actions  # plugins get --debug from main


def test_tensor_parallel_size_option():
    p = build_parser()
    assert p.parse_args(["demo"]).tensor_parallel_size is None  # not given: not passed, the engine's 1
    a = p.parse_args(["rank", "--input", str(EXAMPLES / "cands.jsonl"), "--out", "o", "--tensor-parallel-size", "2"])
    assert a.tensor_parallel_size == 2 and cli.llm_kwargs(a)["tensor_parallel_size"] == 2


@pytest.mark.slow
def test_tensor_parallel_judge_matches_one_rank(tiny_qwen2_dir):
    """--tensor-parallel-size 2 builds a judge whose engine is two spawned gloo ranks on CPU; its
    greedy votes are those of one process."""
    from rrm_engine.cli.main import make_judge
    from rrm_engine.distributed.tp_workers import WorkerEngine
    args = ["demo", "--model", str(tiny_qwen2_dir), "--temperature", "0", "--max-tokens", "6", "--votes", "2",
            "--device", "cpu", "--dtype", "float32", "--quiet"]
    one = make_judge(build_parser().parse_args(args))
    two = make_judge(build_parser().parse_args(args + ["--tensor-parallel-size", "2"]))
    try:
        assert isinstance(two.llm.engine, WorkerEngine) and two.llm.engine.world == 2
        a, b = (j.compare("2+2?", "4", "5") for j in (one, two))
        assert [v.token_ids for v in b.votes] == [v.token_ids for v in a.votes] and len(a.votes[0].token_ids) == 6
    finally:
        two.llm.engine.shutdown()


# --- arguments are checked before the model loads --------------------------------------------------
BAD_ARGUMENTS = [
    (["--votes", "0"], "--votes: must be an integer >= 1"),
    (["--votes", "two"], "--votes: must be an integer >= 1"),
    (["--max-tokens", "-5"], "--max-tokens: must be an integer >= 1"),
    (["--thinking-budget", "0"], "--thinking-budget"),
    (["--temperature", "-0.1"], "--temperature: must be a number >= 0"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-p", "0"], "--top-p: must be a number in (0, 1]"),
    (["--top-p", "1.5"], "--top-p"),
    (["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--kv-cache-tokens", "0"], "--kv-cache-tokens"),
    (["--kv-cache-tokens", "1"], "--kv-cache-tokens: must be an integer >= 16 (one KV block)"),  # LLM's own check
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size: must be an integer >= 1"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--model", "no/such/dir"], "no such file or directory"),
    (["--swap", "sometimes"], "--swap"),
]


@pytest.mark.parametrize("extra,message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_argument_is_one_line_exit_2(extra, message, tmp_path, capsys, no_model_load):
    with pytest.raises(SystemExit) as e:
        main(["judge", "--pairs", str(EXAMPLES / "pairs.jsonl"), "--out", str(tmp_path / "o.jsonl"), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("args,message", [
    (["eval", "--rewardbench", "rb.jsonl", "--limit", "0"], "--limit: must be an integer >= 1"),
    (["eval", "--rewardbench", "rb.jsonl", "--limit", "-995"], "--limit"),
    (["eval", "--pandalm", "missing.json"], "file not found: missing.json"),
    (["rank", "--input", "rank.jsonl", "--out", "o.jsonl", "--method", "swiss"], "--method"),
])
def test_other_commands_check_arguments(args, message, tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "rb.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    write_jsonl(tmp_path / "rank.jsonl", [{"query": "q", "candidates": ["a", "b"]}])
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_input_is_checked_in_full_before_loading(tmp_path, capsys, no_model_load):
    """Every row is parsed and checked by the judge's own rules; the first bad one is named by line."""
    rows = [PAIRS[0], PAIRS[1], "", PAIRS[0], {"query": "  ", "a": "x", "b": "y"}, {"query": "q", "a": "x"}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "o.jsonl"
    assert main(["judge", "--pairs", str(pairs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl line 6" in err and "missing field" in err and len(err.strip().splitlines()) == 1
    write_jsonl(pairs, rows[:5])  # now the first problem is the blank query on line 5
    assert main(["judge", "--pairs", str(pairs), "--out", str(out)]) == 2
    assert "pairs.jsonl line 5: query is empty" in capsys.readouterr().err
    write_jsonl(pairs, [PAIRS[0], "{not json"])
    assert main(["judge", "--pairs", str(pairs), "--out", str(out)]) == 2
    assert "line 2: invalid JSON" in capsys.readouterr().err
    ranks = write_jsonl(tmp_path / "rank.jsonl", [{"query": "q", "candidates": ["a", "b"]}, {"query": "q", "candidates": ["a"]}])
    assert main(["rank", "--input", str(ranks), "--out", str(out)]) == 2
    assert "rank.jsonl line 2: rank needs a list of at least 2 candidates" in capsys.readouterr().err
    assert not out.exists()


def test_pandalm_given_jsonl_names_the_file(tmp_path, capsys, no_model_load):
    f = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "i", "response1": "a"}, {"instruction": "j"}])
    assert main(["eval", "--pandalm", str(f)]) == 2
    err = capsys.readouterr().err
    assert "rows.jsonl is not a PandaLM JSON file" in err and "looks like JSONL" in err


def test_output_location_checked_before_loading(tmp_path, capsys, no_model_load):
    pairs = str(EXAMPLES / "pairs.jsonl")
    existing = write_jsonl(tmp_path / "done.jsonl", [{"index": 0, "id": "x"}])
    assert main(["judge", "--pairs", pairs, "--out", str(existing)]) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert existing.read_text().strip() == '{"index": 0, "id": "x"}'  # untouched
    assert main(["judge", "--pairs", pairs, "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["judge", "--pairs", pairs, "--out", str(blocker / "sub" / "o.jsonl")]) == 2
    assert "cannot create the directory of --out" in capsys.readouterr().err


# --- subprocess: what a user sees -----------------------------------------------------------------
def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], {"query": "", "a": "x", "b": "y"}])
    out = run_cli("judge", "--pairs", str(pairs), "--out", str(tmp_path / "o.jsonl"), timeout=120)
    assert out.returncode == 2 and LOADING not in out.stderr
    assert out.stderr.strip() == f"rrm-engine judge: error: {pairs} line 2: query is empty"
    dbg = run_cli("judge", "--pairs", str(pairs), "--out", str(tmp_path / "o.jsonl"), "--debug", timeout=120)
    assert dbg.returncode != 0 and "Traceback (most recent call last)" in dbg.stderr and "query is empty" in dbg.stderr


def test_judge_streams_rows_and_reports_row_errors(tmp_path, tiny_qwen2_dir):
    """A row whose prompt is longer than the context fails alone: printed as it happens (with its line),
    counted in the summary, kept in --out with its error, exit code 1; --allow-errors makes it 0."""
    long = "word " * 3000  # > the tiny model's 2048-token context
    rows = [PAIRS[0], {"query": "Which is longer?", "a": long, "b": "short", "id": "too-long"}, PAIRS[1]]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "new" / "dir" / "verdicts.jsonl"  # a missing directory is created up front
    res = run_cli("judge", "--pairs", str(pairs), "--out", str(out), "--model", str(tiny_qwen2_dir), "--votes", "2",
                  *FAST)
    assert res.returncode == 1, res.stderr
    assert f"{pairs} line 2 (id 'too-long') failed" in res.stderr and "context" in res.stderr
    assert "1 of 3 rows failed" in res.stderr
    got = read_jsonl(out)
    assert [r["index"] for r in got] == [0, 1, 2] and [r["id"] for r in got] == ["x", "too-long", 2]
    assert got[1]["error"] and got[0]["error"] is None and len(got[0]["votes"]) == 2 and got[0]["label"] == 1
    assert "errors" in res.stdout and "accuracy (labelled)" in res.stdout
    again = run_cli("judge", "--pairs", str(pairs), "--out", str(out), "--model", str(tiny_qwen2_dir), "--votes", "2",
                    "--resume", "--allow-errors", *FAST)
    assert again.returncode == 0, again.stderr  # only the failed row ran again, and failed again
    assert "2 of 3 rows already there, 1 to run" in again.stderr
    assert read_jsonl(out)[0] == got[0]


def test_rank_eval_demo_commands(tmp_path, tiny_qwen2_dir, capsys):
    model = ["--model", str(tiny_qwen2_dir)]
    out = tmp_path / "rank_out.jsonl"
    assert main(["rank", "--input", str(EXAMPLES / "cands.jsonl"), "--out", str(out), "--method", "elo", *model, *FAST]) == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["primes", "greeting"]
    assert sorted(rows[0]["order"]) == [0, 1, 2, 3] and len(rows[0]["matches"]) == 6 and len(rows[1]["matches"]) == 3

    out = tmp_path / "rb_out.jsonl"
    assert main(["eval", "--rewardbench", str(EXAMPLES / "rewardbench_format.jsonl"), "--out", str(out), *model, *FAST]) == 0
    printed = capsys.readouterr().out
    assert "per subset" in printed and "Reasoning" in printed and "Chat" in printed
    assert [r["subset"] for r in read_jsonl(out)] == ["alpacaeval-easy", "math-prm", "refusals-dangerous"]

    assert main(["eval", "--pandalm", str(EXAMPLES / "pandalm_format.json"), *model, *FAST]) == 0
    printed = capsys.readouterr().out
    assert "tie rows (not judged)" in printed and "rows judged (non-tie)" in printed

    assert main(["demo", *model, *FAST]) == 0
    printed = capsys.readouterr().out
    assert "demo: comparisons" in printed and "knockout ranking" in printed


def test_eval_pandalm_test_set(tiny_qwen2_dir, capsys):
    if not PANDALM.exists():
        pytest.skip(f"PandaLM test set not found at {PANDALM}")
    assert main(["eval", "--pandalm", str(PANDALM), "--limit", "3", "--model", str(tiny_qwen2_dir), *FAST]) == 0
    assert "tie rows (not judged)" in capsys.readouterr().out


def test_results_file_resume_drops_a_torn_last_line_and_failed_rows(tmp_path):
    from rrm_engine.cli.results_file import ResultsFile
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"index": 2, "id": "c", "error": None}) + "\n"
                 + json.dumps({"index": 0, "id": "a", "error": "boom"}) + "\n"
                 + '{"index": 1, "id": "b", "err')  # a kill in the middle of a write
    r = ResultsFile(f, resume=True)
    assert set(r.done) == {2}
    r.write({"index": 0, "id": "a", "error": None})
    r.write({"index": 1, "id": "b", "error": None})
    r.close(complete=True)
    assert [row["index"] for row in read_jsonl(f)] == [0, 1, 2]  # input order once complete
    f.write_text('{"index": 0}\nnot json\n{"index": 1}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        ResultsFile(f, resume=True)
