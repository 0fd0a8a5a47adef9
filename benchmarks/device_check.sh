#!/usr/bin/env bash
# The one prepared GPU check of issue 8, for a lent device machine (torch 2.11, transformers 5.17, peft and
# accelerate there; nothing else this needs is missing, so no wheels travel). Run from the repo root:
#
#     bash benchmarks/device_check.sh          # device tool: run(command="bash benchmarks/device_check.sh", timeout_s=600)
#
# Three parts, each under its own time limit so that one that hangs leaves time for the rest (about 9 minutes in
# all at most); every log and result lands in $OUT (default /tmp/device_check):
#   1. correctness on the GPU at the tiny shape: greedy tokens of static and graph against generate, log-probs
#      against a forward pass (benchmarks/rollout.py --tiny --device cuda);
#   2. decode speed at the LLaVA-1.5-7B shape, batch 16 and 64, with its own 7B correctness check
#      (benchmarks/rollout.py -> rollout_bench.json);
#   3. one PPO step at the 7B shape with generate and with the engine (benchmarks/ppo_step.py -> ppo_step.json).
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

part tiny_cuda 75 "$PYTHON" benchmarks/rollout.py --tiny --device cuda --engines generate static graph
mv -f "$OUT/rollout_bench.json" "$OUT/rollout_tiny_cuda.json" 2>/dev/null
part rollout_7b 230 "$PYTHON" benchmarks/rollout.py
part ppo_step_7b 230 "$PYTHON" benchmarks/ppo_step.py
