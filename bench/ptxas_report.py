"""Register spills, registers and shared memory of the Triton kernels as compiled for sm_90, from
ptxas itself: no GPU needed (Triton's NVIDIA backend ships ptxas).

  python -m bench.ptxas_report            every kernel at its launch config (attention at its
                                          default tile, both model shapes); exit 1 on any spill
  python -m bench.ptxas_report --sweep    the attention kernels over a grid of tiles, to choose
                                          spill-free candidates for `bench.kernels --sweep`

Run without TRITON_INTERPRET (the interpreter compiles nothing). tests/test_csrc_build.py runs the
first form in CI so a default tile that spills fails the build.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

# (q heads per kv head, head_dim): SmolLM2-135M (the embedded model), RRM-7B
MODEL_SHAPES = ((3, 64), (7, 128))
PAGE = 16


def _sig(names: str, **typed: str) -> dict[str, str]:
    """Every argument not named in `typed` is an int32 stride or length."""
    return {n: typed.get(n, "i32") for n in names.split()}


DECODE_SIG = _sig("Q K V BT KV_START SEQ_LENS SPLIT_LEN O LSE scale_log2 stride_qb stride_qh stride_kb stride_kt "
                  "stride_kh stride_vb stride_vt stride_vh stride_btb stride_op stride_ob stride_oh stride_lp stride_lb",
                  Q="*bf16", K="*bf16", V="*bf16", BT="*i32", KV_START="*i32", SEQ_LENS="*i32", SPLIT_LEN="*i32",
                  O="*fp32", LSE="*fp32", scale_log2="fp32")
PREFILL_SIG = _sig("Q K V BT QSL SEQ_LENS O scale_log2 stride_qt stride_qh stride_kb stride_kt stride_kh stride_vb "
                   "stride_vt stride_vh stride_btb stride_ot stride_oh", Q="*bf16", K="*bf16", V="*bf16", BT="*i32",
                   QSL="*i32", SEQ_LENS="*i32", O="*bf16", scale_log2="fp32")
PREFIX_SIG = _sig("Q K V GBT GLENS ITEMS MEMBERS SPLIT_LEN O LSE scale_log2 stride_qb stride_qh stride_kb "
                  "stride_kt stride_kh stride_vb stride_vt stride_vh stride_gbt stride_op stride_ob stride_oh "
                  "stride_lp stride_lb", Q="*bf16", K="*bf16", V="*bf16", GBT="*i32", GLENS="*i32", ITEMS="*i32",
                  MEMBERS="*i32", SPLIT_LEN="*i32", O="*fp32", LSE="*fp32", scale_log2="fp32")
MERGE_SIG = _sig("PO PLSE O ROW_LEVELS num_parts level_parts level_splits stride_pp stride_pb stride_ph stride_lp "
                 "stride_lb stride_ob stride_oh", PO="*fp32", PLSE="*fp32", O="*bf16", ROW_LEVELS="*i32")
SAMPLE_SIG = dict(logits_ptr="*bf16", stride_row="i64", row_index_ptr="*i64", temperature_ptr="*fp32",
                  top_k_ptr="*i32", top_p_ptr="*fp32", min_p_ptr="*fp32", seeds_ptr="*i64", offsets_ptr="*i64",
                  tokens_ptr="*i64", logprobs_ptr="*fp32", status_ptr="*i32", B="i32", V="i32")
LOGPROB_SIG = dict(logits_ptr="*bf16", stride_row="i64", labels_ptr="*i64", out_ptr="*fp32", lse_ptr="*fp32",
                   V="i32", inv_t="fp32", ignore_index="i32")


def compile_report(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int,
                   num_stages: int) -> dict[str, int]:
    """{spill_bytes, registers, shared_bytes} of one kernel compiled for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = get_ptxas(90)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        r = subprocess.run([getattr(ptxas, "path", ptxas), "-v", "-arch=sm_90a", ptx, "-o", ptx + ".cubin"],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for {fn.__name__} {constexprs}:\n{r.stderr}")
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    return dict(spill_bytes=int(spill.group(1)) if spill else 0, registers=int(regs.group(1)) if regs else -1,
                shared_bytes=int(k.metadata.shared))


def launch_configs() -> list[tuple[str, Any, dict, dict, int, int]]:
    """(label, kernel, signature, constexprs, num_warps, num_stages) as the kernels launch them."""
    from rrm_kernels.paged_decode import _decode_split_kernel, _merge_parts_kernel, decode_tile
    from rrm_kernels.paged_prefill import _prefill_kernel, prefill_tile
    from rrm_kernels.sampling import NUM_PROBES, _sample_kernel, sample_launch
    from rrm_kernels.selective_log_softmax import _token_logprob_kernel
    from rrm_kernels.shared_prefix_decode import _prefix_pass_kernel, prefix_tile

    jobs = []
    for greedy, (b, v) in itertools.product((False, True), ((256, 152064), (64, 512))):
        bb, blk, search, warps = sample_launch(b, v)
        jobs.append((f"sample greedy_only={greedy} [{b}, {v}]", _sample_kernel, SAMPLE_SIG,
                     dict(GREEDY_ONLY=greedy, BLOCK_B=bb, BLOCK=blk, SEARCH_BLOCK=search, NUM_PROBES=NUM_PROBES),
                     warps, 3))
    jobs.append(("token logprobs", _token_logprob_kernel, LOGPROB_SIG, dict(BLOCK=4096), 8, 3))
    for group, d in MODEL_SHAPES:
        attn = dict(HEAD_DIM=d, D_PAD=d, PAGE=PAGE, DOT_PRECISION="tf32", GROUP=group)
        t = decode_tile(PAGE)
        jobs.append((f"decode g={group} d={d} n{t.block_n} w{t.num_warps}", _decode_split_kernel, DECODE_SIG,
                     dict(attn, G_PAD=16, BLOCK_N=t.block_n, HAS_START=True, DIRECT=False), t.num_warps, 3))
        jobs.append((f"merge parts d={d} chunk 16", _merge_parts_kernel, MERGE_SIG,
                     dict(HEAD_DIM=d, D_PAD=d, P_CHUNK=16), 1 if d <= 64 else 2, 3))
        for rows in (8 * group, 64 * group):  # 8 votes; a group over 64 rows (128-row tiles)
            t = prefix_tile(group, d, PAGE, rows=rows)
            jobs.append((f"prefix pass g={group} d={d} m{t.block_m} n{t.block_n} w{t.num_warps}", _prefix_pass_kernel,
                         PREFIX_SIG, dict(attn, BLOCK_M=t.block_m, BLOCK_N=t.block_n), t.num_warps, 3))
        for rows in (16, 2048 * group):  # a short extend and a long prompt
            t = prefill_tile(d, rows)
            jobs.append((f"prefill g={group} d={d} rows={rows} m{t.block_m} n{t.block_n} w{t.num_warps}", _prefill_kernel, PREFILL_SIG,
                         dict(attn, BLOCK_M=t.block_m, BLOCK_N=t.block_n), t.num_warps, 2))
    return jobs


def sweep_configs() -> list[tuple[str, Any, dict, dict, int, int]]:
    from rrm_kernels.paged_decode import _decode_split_kernel
    from rrm_kernels.paged_prefill import _prefill_kernel
    from rrm_kernels.shared_prefix_decode import _prefix_pass_kernel

    jobs = []
    for group, d in MODEL_SHAPES:
        attn = dict(HEAD_DIM=d, D_PAD=d, PAGE=PAGE, DOT_PRECISION="tf32", GROUP=group)
        for n, w in itertools.product((16, 32, 64), (4, 8)):
            jobs.append((f"decode g={group} d={d} n{n} w{w}", _decode_split_kernel, DECODE_SIG,
                         dict(attn, G_PAD=16, BLOCK_N=n, HAS_START=True, DIRECT=False), w, 3))
        for m, n, w in itertools.product((32, 64), (16, 32, 64), (4, 8)):
            jobs.append((f"prefix pass g={group} d={d} m{m} n{n} w{w}", _prefix_pass_kernel, PREFIX_SIG,
                         dict(attn, BLOCK_M=m, BLOCK_N=n), w, 3))
        for m, n, w in itertools.product((32, 64, 128), (32, 64), (4, 8)):
            jobs.append((f"prefill g={group} d={d} m{m} n{n} w{w}", _prefill_kernel, PREFILL_SIG,
                         dict(attn, BLOCK_M=m, BLOCK_N=n), w, 2))
    return jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ptxas_report", description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="attention kernels over a grid of tiles")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    spilled = []
    print(f"{'kernel (launch config)':56} {'spill B':>8} {'regs':>5} {'smem B':>7}")
    for label, fn, sig, consts, warps, stages in (sweep_configs() if args.sweep else launch_configs()):
        r = compile_report(fn, sig, consts, warps, stages)
        print(f"{label:56} {r['spill_bytes']:8d} {r['registers']:5d} {r['shared_bytes']:7d}", flush=True)
        if r["spill_bytes"]:
            spilled.append(label)
    if spilled and not args.sweep:
        print(f"spills at the launch config: {spilled}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
