#!/usr/bin/env bash
# What a session lent a GPU runs, in order of value; each step fits one 10-minute device call.
#   bash bench/gpu_session.sh check       kernels + engine on CUDA: bf16 at 7B shapes, prefix-tree cascade,
#                                         CUDA graphs (captured at start-up, split-K + cascade from static
#                                         plans), mixed prefill+decode steps, NaN logits failing one request,
#                                         csrc greedy sampler backend (JIT build), B3 gradient under autocast
#   bash bench/gpu_session.sh kernels     python -m bench.kernels --sweep (DESIGN targets, tile alternatives,
#                                         the 3-level prefix-tree case against plain decode)
#   bash bench/gpu_session.sh throughput  python -m bench.throughput on random RRM-7B-shaped weights
#   bash bench/gpu_session.sh graphs      the same with --cuda-graphs (systems b and c), to compare
#   bash bench/gpu_session.sh dry-run     on a CPU: the same tests through Triton's interpreter
#                                         (RRM_GPU_TEST_DEVICE=cpu) and the sm_90 spill report
#   bash bench/gpu_session.sh todo        print what still needs a GPU (also printed by every step)
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
run() { echo "+ $*" | tee -a "$out/commands.txt"; "$@"; }
todo() {
  cat <<'EOF'
== Still unverified on a GPU (issue 13); each line names the step that checks it ==
 check      bf16 numerics of every kernel at RRM-7B shapes (interpreter runs only fp32/fp16)
 check      CUDA graph capture at start-up (StaticDecode.capture_all): graphs replay split-K sized
            to the step's context and the prefix-tree cascade from static plan buffers
 check      mixed steps: decode rows through decode/cascade, prefill rows through prefill, one step
 check      NaN/inf logits: Triton and csrc sampler flags fail one request, the batch goes on
 check      csrc greedy sampler backend (LLM(sampler_backend="csrc")): JIT build, tokens = Triton's
 check      selective log-softmax gradient under CUDA bf16 autocast = autograd's of the same forward
 kernels    targets: paged decode b64 x 4K >= 70% of copy bandwidth; shared prefix 8 votes x 4K >= 3x
            plain decode; sampler [256, 152064] >= 3x torch sort top-p; prefill 2K within 1.5x SDPA;
            prefix-tree decode (3 levels) vs plain decode; pick tile defaults from the --sweep lines
 throughput judging workload at 7B shapes >= 60% of the memory roofline and >= 5x transformers
 graphs     the same workload with --cuda-graphs: tokens/s against the throughput step's (c)
 memory     the memory plan, graph pools and the GRPO reserve (tests/gpu/test_memory_gpu.py, branch gpu-memtp)
 unknown    whether 128-row prefix tiles (groups over 64 rows) beat 64-row ones; the per-step
            plan's host cost (python) against a 7B decode step
EOF
}
if [ "${1:-check}" != "dry-run" ] && [ "${1:-check}" != "todo" ]; then
  unset TRITON_INTERPRET
  { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; python -c \
    "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } \
    > "$out/device.txt" 2>&1
fi
case "${1:-check}" in
  check)
    todo
    run timeout 560 python -m pytest -q -rs tests/gpu tests/test_csrc_build.py tests/test_engine_triton.py --runslow \
      2>&1 | tee "$out/check.log" ;;
  kernels)
    todo
    run timeout 560 python -m bench.kernels --sweep 2>&1 | tee "$out/kernels.log" ;;
  throughput)
    todo
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
  graphs)
    todo
    run timeout 560 python -m bench.throughput --device cuda --shape qwen2-7b --systems b,c --cuda-graphs \
      --json "$out/throughput_graphs.json" 2>&1 | tee "$out/throughput_graphs.log" ;;
  dry-run)
    export RRM_GPU_TEST_DEVICE=cpu TRITON_INTERPRET=1
    run timeout 1800 python -m pytest -q -rs tests/gpu 2>&1 | tee "$out/dry-run.log"
    (unset TRITON_INTERPRET; run timeout 600 python -m bench.ptxas_report) 2>&1 | tee -a "$out/dry-run.log" ;;
  todo)
    todo ;;
  *) echo "usage: bash bench/gpu_session.sh check|kernels|throughput|graphs|memory|dry-run|todo" >&2; exit 2 ;;
esac
