"""System (d) of bench.throughput: llama.cpp through llama-cpp-python. It runs only where llama_cpp
imports (CI does not need it); without it the report says so in one line and the rest runs."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from bench import llamacpp, throughput

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def test_skip_line_without_llama_cpp(tiny_qwen2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    assert llamacpp.unavailable_reason() == llamacpp.SKIP_LINE
    out = tmp_path / "r.json"
    throughput.main(["--model", str(tiny_qwen2_dir), "--systems", "c,d", "--queries", "1", "--candidates", "2",
                     "--votes", "2", "--gen-len", "2", "--prompt-len", "150", "--json", str(out)])
    printed = capsys.readouterr().out
    assert printed.count(llamacpp.SKIP_LINE) >= 1
    run = json.loads(out.read_text())["run"]
    assert set(run["systems"]) == {"c"} and run["llamacpp_skipped"] == llamacpp.SKIP_LINE
    assert "c/d" not in run["ratios"]


def test_bad_llamacpp_precision_is_refused(capsys):
    with pytest.raises(SystemExit):
        throughput.parse_args(["--llamacpp", "q4_1,q3_k"])
    assert "--llamacpp" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (the bench-llamacpp extra)")
def test_llamacpp_system_runs_the_same_work(embedded_path, tmp_path):
    from rrm_engine.model.gguf_loader import cache_root
    out = tmp_path / "r.json"
    votes, gen = 3, 4
    throughput.main(["--model", "embedded", "--systems", "c,d", "--llamacpp", "q4_1,f32", "--queries", "1",
                     "--candidates", "2", "--votes", str(votes), "--gen-len", str(gen), "--prompt-len", "150",
                     "--json", str(out), "--quiet"])
    run = json.loads(out.read_text())["run"]
    assert {"c", "d:q4_1", "d:f32"} <= set(run["systems"])
    want = run["params"]["comparisons"] * votes * gen
    c = run["systems"]["c"]
    for key in ("d:q4_1", "d:f32"):
        d = run["systems"][key]
        assert d["generated_tokens"] == c["generated_tokens"] == want
        # one prompt decoded per comparison, forked to the votes
        assert d["prefill_tokens_computed"] == d["prefill_tokens_requested"] == c["prefill_tokens_requested"]
        assert d["generated_tokens_per_s"] > 0 and d["notes"]["threads"] >= 1
    assert run["llamacpp_fastest"] in ("d:q4_1", "d:f32")
    fastest = run["systems"][run["llamacpp_fastest"]]["generated_tokens_per_s"]
    assert run["ratios"]["c/d"]["generated_tokens_per_s"] == pytest.approx(c["generated_tokens_per_s"] / fastest)
    assert (cache_root() / "llamacpp" / f"{embedded_path.stem}.f32.gguf").is_file()  # llama.cpp's own conversion
