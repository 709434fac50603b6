#!/usr/bin/env bash
# Wheels for a GPU machine that has torch and transformers but no package index: the base
# packages the trainer path imports beside them, at the versions installed here, for CPython
# 3.12 on manylinux x86-64, into .whl/ (kept out of git). On the GPU machine:
#
#     python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#     PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu_mfu_sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
packages=(pydantic pydantic-core pydantic-settings annotated-types typing-inspection
  typing-extensions python-dotenv SQLAlchemy)
pinned=()
for package in "${packages[@]}"; do
  pinned+=("$package==$(python3 -c "import importlib.metadata as m; print(m.version('$package'))")")
done
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pinned[@]}"
ls .whl
