#!/usr/bin/env bash
# One-GPU benchmark (see bench/gpu.py); needs only python with torch + torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu.py "$@"
