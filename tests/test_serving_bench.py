"""bench/serving.py end to end with one in-process engine (no Ray; tiny random Qwen2 with the SmolLM2
tokenizer): the report has every figure for the judge and the streamed-completion phases, and bad
options are refused. No timing is asserted."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from bench.serving import main  # noqa: E402


def test_one_replica_report(tiny_qwen2_dir, smollm2_tokenizer, tmp_path):
    out = tmp_path / "serving.json"
    # --rate: Poisson arrivals (the runs in bench/RESULTS.md used --concurrency)
    assert main(["--model", str(tiny_qwen2_dir), "--replicas", "1", "--requests", "3", "--rate", "50",
                 "--votes", "1", "--max-tokens", "4", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"]["1"]
    assert r["judge"]["requests"] == 3 and r["judge"]["judgments_per_s"] > 0
    assert r["judge"]["e2e_p50_s"] <= r["judge"]["e2e_p99_s"]
    c = r["completions"]
    assert 0 < c["ttft_p50_s"] <= c["e2e_p50_s"] and c["tpot_p50_s"] > 0


@pytest.mark.parametrize("argv", [["--replicas", "0"], ["--replicas", "1,x"], ["--requests", "0"],
                                  ["--rate", "-1"], ["--votes", "0"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("must be > 0" in err or "list of ints >= 1" in err), err
