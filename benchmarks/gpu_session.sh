#!/usr/bin/env bash
# The GPU session in one command, for the device machine: the service's own packages from .whl/
# (`gpu_wheels.sh` downloads them where an index is reachable), the MFU sweep
# (`gpu_mfu_sweep.sh`) until the deadline (seconds, default 540) and, after its first configs,
# a real job end to end (`gpu_job.py`). Results go to $OUT (or ./gpu-mfu-results): job.json and
# job.log beside the sweep's five files.
#
#     bash benchmarks/gpu_session.sh [deadline_seconds]
#     GPU_MFU_FIRST="service-b64" GPU_MFU_CONFIGS="service-nodropout" \
#       bash benchmarks/gpu_session.sh 300     # other configs before and after the job
#
# On a CPU, to check it all before spending device time, tiny and short:
#
#     GPU_JOB_EXTRA=--smoke GPU_MFU_EXTRA="--smoke --runs 1 --steps 8 --warmup 2 --job-steps 8" \
#       bash benchmarks/gpu_session.sh 1200
set -uo pipefail
cd "$(dirname "$0")/.."
deadline=${1:-540}
out=${OUT:-gpu-mfu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
wheels=${GPU_WHEELS:-.whl}  # another folder for another Python, e.g. to rehearse on a CPU
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/tunery-site "$wheels"/*.whl || exit
  export PYTHONPATH=/tmp/tunery-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

# The sweep's first configs (the headline, its reference and the profile), then the job, then
# the rest of the sweep. The job compiles into an inductor cache of its own, cold, as a fresh
# worker's first job does, and logs its recompilations. `timeout` keeps the sweep's time if the
# job hangs; its SIGTERM makes the script stop `tunery up` (a process group of its own) first.
first=${GPU_MFU_FIRST-service bare profile}  # set and empty: the job first
if [[ -n "$first" ]]; then
  GPU_MFU_CONFIGS=$first bash benchmarks/gpu_mfu_sweep.sh $((deadline - SECONDS))
fi
job_seconds=$((deadline - SECONDS < ${GPU_JOB_SECONDS:-240} ? deadline - SECONDS : ${GPU_JOB_SECONDS:-240}))
# shellcheck disable=SC2086
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TORCH_LOGS=recompiles \
  timeout -k 60 "$job_seconds" python3 benchmarks/gpu_job.py \
  --json "$out/job.json" ${GPU_JOB_EXTRA:-} >"$out/job.log" 2>&1
echo "== job: exit $? after ${SECONDS}s" | tee -a "$out/summary.txt"
grep -vE "Loading weights|Writing model" "$out/job.log" | tail -30
GPU_MFU_SKIP=$first bash benchmarks/gpu_mfu_sweep.sh $((deadline - SECONDS))
