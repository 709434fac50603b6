#!/usr/bin/env bash
# Wheels for a GPU machine that has torch, transformers and the other training packages but no
# package index: what the service itself needs beside them (its API, queue, database and settings
# stack, enough for `tunery up` and a real job), at the versions installed here, for CPython 3.12
# on manylinux x86-64, into .whl/ (kept out of git). The machine's own torch, transformers,
# tokenizers, safetensors, accelerate, peft, numpy and huggingface_hub are the ones measured.
# `gpu_session.sh` installs them on the GPU machine:
#
#     python3 -m pip install --no-index --no-deps --target /tmp/tunery-site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
packages=(
  # settings and schemas
  pydantic pydantic-core pydantic-settings annotated-types typing-inspection typing-extensions
  python-dotenv
  # database
  SQLAlchemy alembic Mako psycopg psycopg-binary psycopg-pool
  # API
  fastapi starlette annotated-doc opentelemetry-api anyio uvicorn h11 httptools python-multipart
  prometheus-client
  # queue
  celery kombu billiard vine amqp redis click click-didyoumean click-repl click-plugins
  prompt-toolkit wcwidth tzlocal python-dateutil
)
pinned=()
for package in "${packages[@]}"; do
  pinned+=("$package==$(python3 -c "import importlib.metadata as m; print(m.version('$package'))")")
done
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pinned[@]}"
ls .whl
du -sh .whl
