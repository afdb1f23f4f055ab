"""Smoke test of `python -m bench.throughput` end to end on the tiny random Qwen2 (no timing asserts):
the report's structure and the invariants that make the comparison fair and the sharing real."""
from __future__ import annotations

import json

import pytest

from bench import throughput

VOTES, GEN, CANDIDATES = 2, 4, 3


@pytest.fixture(scope="module")
def report(tiny_qwen2_dir, smollm2_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "r.json"
    throughput.main(["--model", str(tiny_qwen2_dir), "--queries", "1", "--candidates", str(CANDIDATES),
                     "--votes", str(VOTES), "--gen-len", str(GEN), "--prompt-len", "200", "--method", "both",
                     "--json", str(out), "--quiet", "--profile", str(tmp / "prof"), "--profile-steps", "3"])
    return json.loads(out.read_text())


def test_report_structure(report):
    run = report["run"]
    assert set(run["systems"]) == {"a", "b", "c"}
    assert set(run["ratios"]) == {"c/a", "c/b"}
    for s in run["systems"].values():
        for key in ("comparisons_per_s", "generated_tokens_per_s", "prefill_tokens_computed",
                    "prefill_tokens_requested", "kv_peak_bytes", "p50_s_per_comparison", "p99_s_per_comparison"):
            assert s[key] >= 0, key
        assert s["p50_s_per_comparison"] <= s["p99_s_per_comparison"]
    assert run["roofline_c"] is not None and 0 < run["roofline_c"]["fraction"]
    assert report["ceilings"]["copy_bytes_per_s"] > 0 and report["ceilings"]["mm_flops_per_s"] > 0


def test_profile_trace(report):
    trace = json.loads(open(report["profile_trace"]).read())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "engine.step" in names and any(str(n).startswith("aten::") for n in names)
    # the engine marks its own phases inside each step
    assert {"engine.schedule", "engine.forward", "engine.sample"} <= names


def test_same_work_and_sharing(report):
    run = report["run"]
    # knockout over 3 candidates: 2 matches; ELO round robin: 3 pairs
    assert run["params"]["comparisons"] == 2 + 3
    a, b, c = (run["systems"][k] for k in "abc")
    want = run["params"]["comparisons"] * VOTES * GEN
    assert a["generated_tokens"] == b["generated_tokens"] == c["generated_tokens"] == want
    requested = c["prefill_tokens_requested"]
    assert a["prefill_tokens_requested"] == b["prefill_tokens_requested"] == requested
    # (c) prefills each prompt at most once, less where the radix tree shares the query prefix
    assert c["prefill_tokens_computed"] < requested
    # without sharing every vote computes its whole prompt; transformers expands and pads it
    assert b["prefill_tokens_computed"] >= VOTES * requested
    assert a["prefill_tokens_computed"] >= VOTES * requested
    assert c["kv_peak_bytes"] < b["kv_peak_bytes"]


@pytest.mark.parametrize("argv", [["--systems", "a,x"], ["--votes", "0"], ["--sweep", "temperature", "1,2"],
                                  ["--plot", "x.png"], ["--layers", "2"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        throughput.parse_args(argv)
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_qwen2_7b_shape_shares_every_weight_with_transformers():
    """bench --shape qwen2-7b holds one copy of the weights: transformers' separate q/k/v and
    gate/up are views into the decoder's fused weights (one layer, bf16: ~2.6 GB of CPU memory)."""
    import torch

    from bench.baselines import random_qwen2_7b

    hf, loaded = random_qwen2_7b(1, None, torch.device("cpu"), torch.bfloat16)
    storages = {p.untyped_storage().data_ptr() for p in loaded.model.parameters()}
    assert all(p.untyped_storage().data_ptr() in storages for p in hf.parameters())
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        ref = hf(ids).logits[0].float()
        mine = loaded.model.compute_logits(loaded.model(ids, torch.arange(8)[None])).float()[0]
    assert (ref - mine).abs().max().item() < 0.05 * ref.abs().max().item()


def test_decode_step_bound_counts_the_weights_as_served(tiny_qwen2_dir):
    """bench.decode_step --weights: the weight-bandwidth bound reads the served bytes (q8_0 blocks:
    34 bytes per 32 weights), and the quantised model decodes through the whole benchmark."""
    import torch

    from bench import decode_step
    from rrm_engine import LLM
    from rrm_engine.model.loader import load

    def served_bytes(weights: str) -> int:
        return decode_step.weight_bytes(LLM(load(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32),
                                            weights=weights, kv_cache_tokens=256))

    ratio = served_bytes("q8_0") / served_bytes("fp32")
    assert 34 / 128 <= ratio < 0.3, ratio  # the norms stay fp32
    res = decode_step.main(["--model", str(tiny_qwen2_dir), "--weights", "q8_0", "--rows", "8", "--context", "80",
                            "--steps", "2", "--warmup", "1", "--repeat", "1", "--variants", "cpu", "--breakdown"])
    assert [r["rows"] for r in res] == [8] and res[0]["median_s"] > 0 and res[0]["weight_bound_s"] > 0
    # the breakdown timed the ops the decoder really called: one attention and 4 quantised linears
    # a layer, an LM head, a sampler call a step
    ops = res[0]["breakdown"]
    layers = load(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32).model.cfg.num_layers
    assert ops["paged_decode"]["calls_per_step"] == layers
    assert ops["quant_linear"]["calls_per_step"] == 4 * layers + 1  # qkv, o, gate/up, down; the LM head
    assert ops["sample"]["calls_per_step"] == 1 and ops["step"]["calls_per_step"] == 1
    assert 0 < sum(v["ms_per_step"] for k, v in ops.items() if k != "step") < ops["step"]["ms_per_step"]
    from rrm_kernels import cpu_ops
    assert cpu_ops.load().rms_norm.__name__ == "rms_norm"  # the wrappers are gone after the breakdown


def test_decode_step_says_when_the_bandwidth_target_is_out_of_reach():
    from bench.decode_step import reachability
    assert "out of reach" in reachability(w_bound=2.5e-3, c_bound=5.8e-3)  # Q4_1 at 8 rows on the 2-core VM
    assert "reachable in principle" in reachability(w_bound=13.3e-3, c_bound=13.5e-3)  # fp32 at 8 rows
    assert "reachable in principle" in reachability(w_bound=10e-3, c_bound=12e-3)  # exactly 1.2x


def test_decode_step_variants_name_backend_threads_and_cache_dtype():
    from bench.decode_step import parse_variant
    assert parse_variant("cpu") == ("cpu", None, None)
    assert parse_variant("cpu@1") == ("cpu", 1, None)
    assert parse_variant("torch:bf16") == ("torch", None, "bf16")
    assert parse_variant("cpu@2:float16") == ("cpu", 2, "float16")
    assert parse_variant("cpu-modules@1") == ("cpu-modules", 1, None)


def test_decode_step_cpu_modules_variant_steps_the_modules(tiny_qwen2_dir):
    import torch

    from bench.decode_step import make_llm
    from rrm_engine.model.loader import load
    loaded = load(str(tiny_qwen2_dir), device="cpu", dtype=torch.float32)
    assert make_llm(loaded, "cpu-modules", 256).engine.model.serving_forward is None
    assert make_llm(loaded, "cpu", 256).engine.model.serving_forward is not None


def test_engine_kv_cache_dtype_halves_the_reported_kv(tiny_qwen2_dir, tmp_path):
    runs = {}
    for kv in (None, "bfloat16"):
        out = tmp_path / f"{kv}.json"
        throughput.main(["--model", str(tiny_qwen2_dir), "--systems", "c", "--queries", "1", "--candidates", "2",
                         "--votes", "2", "--gen-len", "3", "--prompt-len", "150", "--json", str(out), "--quiet"]
                        + (["--kv-cache-dtype", kv] if kv else []))
        runs[kv] = json.loads(out.read_text())["run"]["systems"]["c"]
    assert runs["bfloat16"]["generated_tokens"] == runs[None]["generated_tokens"] == 2 * 3
    assert runs["bfloat16"]["kv_peak_bytes"] * 2 == runs[None]["kv_peak_bytes"]
