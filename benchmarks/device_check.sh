#!/usr/bin/env bash
# The one prepared GPU check of issue 8, for a lent device machine (torch 2.11, transformers 5.17, peft and
# accelerate there; nothing else this needs is missing, so no wheels travel). Run from the repo root:
#
#     bash benchmarks/device_check.sh          # device tool: run(command="bash benchmarks/device_check.sh", timeout_s=600)
#
# Before it (its parts fill the 600 s a command may take), `python3 benchmarks/review_gpu_check.py` checks in half a
# minute what the 2026-12-07 review fixed for GPUs: PPO's reductions under a plain NCCL group, the 4-bit skip list.
#
# Four parts, each under its own time limit so that one that hangs leaves time for the rest (under 9 1/2 minutes
# in all at most; about 6 1/2 expected from the H200 run of 2026-12-04, benchmarks/results/h200-2026-12-04);
# every log and result lands in $OUT (default /tmp/device_check):
#   1. correctness on the GPU at the tiny shape: greedy tokens of static and graph against generate, log-probs
#      against a forward pass (benchmarks/rollout.py --tiny --device cuda; 18 s measured);
#   2. the same at the 7B shape in float32, where near-ties are rare, so every row must match (under a minute);
#   3. decode speed at the LLaVA-1.5-7B shape in bf16, batch 16 and 64, with its own bf16 check, whose rows may
#      part at near-ties (benchmarks/rollout.py -> rollout_bench.json; 81 s);
#   4. one PPO step at the 7B shape with generate and with the engine, each after one untimed step
#      (benchmarks/ppo_step.py -> ppo_step.json; about 250 s: 52 s per generate step, 45 s per graph step).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}

part() {   # part NAME SECONDS COMMAND...: run COMMAND under a time limit, log to $OUT/NAME.log, record its status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  "$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| transformers', transformers.__version__, '| peft', peft.__version__, '| gpu', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/summary.txt"

part tiny_cuda 45 "$PYTHON" benchmarks/rollout.py --tiny --device cuda --engines generate static graph
mv -f "$OUT/rollout_bench.json" "$OUT/rollout_tiny_cuda.json" 2>/dev/null
part check_fp32_7b 75 "$PYTHON" benchmarks/rollout.py --dtype float32 --batches 16 --check-only
mv -f "$OUT/rollout_bench.json" "$OUT/rollout_check_fp32.json" 2>/dev/null
part rollout_7b 150 "$PYTHON" benchmarks/rollout.py
part ppo_step_7b 300 "$PYTHON" benchmarks/ppo_step.py
