#!/usr/bin/env bash
# One prepared GPU session: `gpu_mfu.py` for several configs, each in its own process so that
# one config's compiled graphs cannot leak into the next. Results go to $OUT (or ./gpu-mfu-results)
# in five files: gpu.txt, summary.txt, sweep.log, results.jsonl (a line per config) and
# profile.txt. A config is skipped once the deadline (seconds, first argument, default 480) is
# near, so the ones that ran still come back.
#
#     bash benchmarks/gpu_mfu_sweep.sh [deadline_seconds]
#
# GPU_MFU_CONFIGS names the configs to run (default: all, in the order below), GPU_MFU_SKIP the
# ones to leave out. GPU_MFU_EXTRA is
# added to every config's arguments, and later arguments win. To check the whole sweep on a CPU
# before spending device time, tiny and short:
#
#     GPU_MFU_EXTRA="--smoke --runs 1 --steps 8 --warmup 2 --job-steps 8" \
#       bash benchmarks/gpu_mfu_sweep.sh 900
set -uo pipefail
cd "$(dirname "$0")/.."
deadline=${1:-480}
extra=${GPU_MFU_EXTRA:-}
chosen=${GPU_MFU_CONFIGS:-}
skipped=${GPU_MFU_SKIP:-}
out=${OUT:-gpu-mfu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Graph breaks and recompilations cost every step; sweep.log says where, if there are any.
export TORCH_LOGS=${TORCH_LOGS:-graph_breaks,recompiles}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

# Most telling first, as the deadline may cut the tail: the service; the same model in a
# hand-written loop (`bare`: what the service's loop costs); a profile of the service's steps
# (device time by kind of kernel, and the host syncs each step forces, by CUDA's sync debug
# mode); the service with two loader processes, as it loaded before a job had to load batches
# in its own process (what that costs, side by side); the service with `lean_loss.py`'s loss
# (a candidate fix: the loss was 9% of a step), with and without dropout. Then where 45% lies:
# no dropout (the base model's config; llm.c has none), batch 64 (a hyperparameter) and both.
# Then the service as it was when it measured 32.9% (a graph break in every step, and the mask
# transformers builds); a nanoGPT-style model (`minimal`: what the Hugging Face model code
# costs); the service with only the mask back; the service after a baseline eval whose last
# batch is short, as in a job with validation; cuDNN's attention first (torch 2.11 already takes
# it for this model on Hopper).
# Fields: name | runs | gpu_mfu.py arguments.
reference="--batch-size 32 --compile --vocab-size 50304"
configs=(
  "service|3|$reference"
  "bare|2|$reference --path bare"
  "profile|1|$reference --profile $out/profile.txt"
  "service-workers|2|$reference --loader-workers 2"
  "service-lean-loss|2|$reference --lean-loss"
  "service-nodropout-lean-loss|2|$reference --dropout 0 --lean-loss"
  "service-nodropout|2|$reference --dropout 0"
  "service-b64|2|--batch-size 64 --compile --vocab-size 50304"
  "service-b64-nodropout|2|--batch-size 64 --compile --vocab-size 50304 --dropout 0"
  "service-before|2|$reference --without-loss-type --stock-attention"
  "minimal|2|$reference --path minimal"
  "service-masked|2|$reference --stock-attention"
  "service-evals|2|$reference --evaluate-first"
  "service-cudnn|2|$reference --sdpa cudnn"
)
for config in "${configs[@]}"; do
  IFS="|" read -r name runs arguments <<<"$config"
  if [[ -n "$chosen" && " $chosen " != *" $name "* ]] || [[ " $skipped " == *" $name "* ]]; then
    continue
  fi
  left=$((deadline - SECONDS))
  if ((left < 60)); then
    echo "== $name skipped: ${left}s left" | tee -a "$out/summary.txt"
    continue
  fi
  echo "== $name (${left}s left)" | tee -a "$out/summary.txt"
  echo "#### config $name" >>"$out/sweep.log"
  # 75 timed steps of a 1,000-step job, which logs (reads the loss on the host) every 20 steps.
  # shellcheck disable=SC2086
  timeout "$left" python3 benchmarks/gpu_mfu.py --steps 100 --warmup 25 --job-steps 1000 \
    --runs "$runs" $arguments $extra \
    --json "$out/$name.json" >"$out/$name.log" 2>&1
  echo "exit $? after ${SECONDS}s" | tee -a "$out/summary.txt"
  grep -E "^\| [0-9]|run [0-9]:|Error|error" "$out/$name.log" | tail -6 | tee -a "$out/summary.txt"
  cat "$out/$name.log" >>"$out/sweep.log" && rm "$out/$name.log"
  if [[ -f "$out/$name.json" ]]; then
    cat "$out/$name.json" >>"$out/results.jsonl" && rm "$out/$name.json"
  fi
done
