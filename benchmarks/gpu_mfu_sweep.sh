#!/usr/bin/env bash
# One prepared GPU session: `gpu_mfu.py` for several configs, each in its own process so that
# one config's compiled graphs cannot leak into the next. Results go to $OUT (or ./gpu-mfu-results).
# A config is skipped once the deadline (seconds, first argument, default 470) is near, so the
# ones that ran still come back.
#
#     bash benchmarks/gpu_mfu_sweep.sh [deadline_seconds]
set -uo pipefail
cd "$(dirname "$0")/.."
deadline=${1:-470}
out=${OUT:-gpu-mfu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

# Measured on 2026-11-30 (BENCHMARKS.md section 6): eager, and compiled with vocab 50257 and
# 50304. Next: what the 0.1 dropouts and a larger batch cost, and a profile of the reference.
configs=(
  "compile-b32-v50304|--batch-size 32 --compile --vocab-size 50304"
  "compile-b32-v50304-nodropout|--batch-size 32 --compile --vocab-size 50304 --dropout 0"
  "compile-b64-v50304|--batch-size 64 --compile --vocab-size 50304"
  "profile-compile-b32-v50304|--batch-size 32 --compile --vocab-size 50304 --runs 1 --profile $out/profile.txt"
)
for config in "${configs[@]}"; do
  name=${config%%|*}
  left=$((deadline - SECONDS))
  if ((left < 60)); then
    echo "== $name skipped: ${left}s left" | tee -a "$out/summary.txt"
    continue
  fi
  echo "== $name (${left}s left)" | tee -a "$out/summary.txt"
  # shellcheck disable=SC2086
  timeout "$left" python3 benchmarks/gpu_mfu.py --steps 150 --warmup 30 --runs 3 ${config#*|} \
    --json "$out/$name.json" >"$out/$name.log" 2>&1
  echo "exit $? after ${SECONDS}s" | tee -a "$out/summary.txt"
  grep -E "^\| [0-9]|run [0-9]:|Error|error" "$out/$name.log" | tail -6 | tee -a "$out/summary.txt"
done
