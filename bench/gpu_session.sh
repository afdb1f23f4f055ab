#!/usr/bin/env bash
# What a session lent a GPU runs, in order of value; each step fits one 10-minute device call.
#   bash bench/gpu_session.sh check       kernels + engine on CUDA (bf16, 7B shapes, CUDA graphs), csrc JIT build
#   bash bench/gpu_session.sh kernels     python -m bench.kernels --sweep (targets of issue 3, tile alternatives)
#   bash bench/gpu_session.sh throughput  python -m bench.throughput on random RRM-7B-shaped weights
# Logs go to $OUT (the device tool's output folder) or bench/out/. Record what you measured in
# bench/RESULTS.md with device, date and command.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
run() { echo "+ $*" | tee -a "$out/commands.txt"; "$@"; }
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; python -c \
  "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } \
  > "$out/device.txt" 2>&1
case "${1:-check}" in
  check)
    run timeout 560 python -m pytest -q -rs tests/gpu tests/test_csrc_build.py tests/test_engine_triton.py --runslow \
      2>&1 | tee "$out/check.log" ;;
  kernels)
    run timeout 560 python -m bench.kernels --sweep 2>&1 | tee "$out/kernels.log" ;;
  throughput)
    run timeout 560 python -m bench.throughput --device cuda --shape qwen2-7b --json "$out/throughput.json" \
      2>&1 | tee "$out/throughput.log" ;;
  *) echo "usage: bash bench/gpu_session.sh check|kernels|throughput" >&2; exit 2 ;;
esac
