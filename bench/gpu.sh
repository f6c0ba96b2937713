#!/usr/bin/env bash
# The one GPU command: the GPU tests (pytest -m gpu) and every GPU benchmark (bench/gpu.py), one table
# each, JSON to bench/results/gpu.json and $OUT/gpu.json.  Needs python with torch, torchvision and
# PyYAML; the checkout is used in place (PYTHONPATH).  Parts that need pycocotools (the loader) and
# the tests (pytest) use them when importable, else install them from a local wheel folder:
#   WHEELS=.whl bash bench/gpu.sh        # wheels made here by: bash scripts/gpu_wheels.sh
# Budget: under 6 minutes on one H100/H200 (GPU tests ~2 min, benchmarks ~4 min); every target is
# checked by bench/gpu.py and written as pass/fail into gpu.json["targets"].
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
WHEELS=${WHEELS:-.whl}
missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("pycocotools", "pytest") if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ] && [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  site=${TMPDIR:-/tmp}/megdet-gpu-site
  echo "[gpu.sh] installing $missing from $WHEELS into $site"
  "$PY" -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("[gpu.sh]", torch.__version__, torch.cuda.get_device_name())' || exit 2

status=0
if "$PY" -c 'import pytest' 2>/dev/null; then
  echo "=== GPU tests (pytest -m gpu)"
  marks="gpu"
  "$PY" -c 'import pycocotools' 2>/dev/null || marks="gpu and not coco"
  # Only the GPU test files: collecting the rest would import Horovod, submitit and psutil, which the
  # GPU machine does not have.
  mapfile -t files < <(find tests -name 'test_*_gpu.py' | sort)
  "$PY" -m pytest -q -p no:cacheprovider -m "$marks" "${files[@]}" || status=1
else
  echo "=== GPU tests NOT RUN: pytest is not importable here (give WHEELS=DIR with its wheels)"
fi
echo "=== GPU benchmarks (bench/gpu.py)"
"$PY" bench/gpu.py "$@" || status=1
exit $status
