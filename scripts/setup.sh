#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for megdet_hpc: system packages (OpenMPI, Slurm),
# a .venv with torch 2.14.1 + torchvision 0.29.1, the Python dependencies, Horovod built from source
# (scripts/build_horovod.sh) and megdet_hpc itself in editable mode.  Safe to run again: every step
# checks first and does nothing when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
APT_PKGS="libopenmpi-dev openmpi-bin slurm-wlm iproute2"  # iproute2: the multi-node test cluster

missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[setup] apt-get install$missing"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$(cd "$VENV" && pwd)/bin/python"
stamp="$VENV/.megdet_deps"
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
  echo "[setup] pip install torch + requirements (torch comes from local files)"
  "$PY" -m pip install -q --upgrade pip wheel setuptools packaging
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$PY" -m pip install -q -r requirements.txt
  touch "$stamp"
fi
PYTHON="$PY" scripts/build_horovod.sh
# Import from outside the checkout: from here the source tree itself would be found on sys.path.
here=$(pwd)
if [ "$(cd / && "$PY" -c 'import megdet_hpc, os; print(os.path.dirname(os.path.dirname(megdet_hpc.__file__)))' 2>/dev/null)" != "$here" ]; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
echo "[setup] ready: $("$PY" -c 'import torch, torchvision, horovod; print("torch", torch.__version__, "torchvision", torchvision.__version__, "horovod", horovod.__version__)')"
