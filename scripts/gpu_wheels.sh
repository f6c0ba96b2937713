#!/usr/bin/env bash
# Wheels the GPU machine lacks (no package registry there): pycocotools for the loader and pytest for
# the GPU tests, for its Python 3.12.  Run here, then carry .whl/ with the device call and run
#   WHEELS=.whl bash bench/gpu.sh
# .whl/ is ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl pycocotools pytest pluggy iniconfig packaging pygments pytest-timeout
ls -l .whl
