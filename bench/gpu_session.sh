#!/usr/bin/env bash
# What a session lent a GPU runs, in order of value; each step fits one 10-minute device call.
#   bash bench/gpu_session.sh check       kernels + engine on CUDA (bf16, 7B shapes, CUDA graphs), csrc JIT build
#   bash bench/gpu_session.sh kernels     python -m bench.kernels --sweep (targets of issue 3, tile alternatives)
#   bash bench/gpu_session.sh throughput  python -m bench.throughput on random RRM-7B-shaped weights
#   bash bench/gpu_session.sh memory      memory plan at 7B shapes (profiled peak vs a real full step, graph
#                                         pools, budget held), GRPO trainer reserve vs a real step, one GRPO
#                                         step from the CLI (bf16 rollouts, plan printed); TP=2 only with 2 GPUs
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
  memory)
    run timeout 300 python -m pytest -q -rs -s tests/gpu/test_memory_gpu.py 2>&1 | tee "$out/memory.log"
    python - > "$out/pairs.jsonl" <<'PY'
import json
for i in range(8):
    print(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"}))
PY
    run timeout 240 python -m rrm_engine train --model embedded --data "$out/pairs.jsonl" --out "$out/grpo" \
      --steps 1 --group-size 4 --pairs-per-step 2 --max-tokens 64 2>&1 | tee "$out/grpo.log" ;;
  *) echo "usage: bash bench/gpu_session.sh check|kernels|throughput|memory" >&2; exit 2 ;;
esac
