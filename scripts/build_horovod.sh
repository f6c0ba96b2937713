#!/usr/bin/env bash
# Build Horovod 0.28.1 (the last release, sdist only) against torch 2.14 and install it into the
# active Python.  Why a script: 0.28.1 as shipped does not build against torch >= 2.1:
#   1. CMakeLists.txt and horovod/torch/CMakeLists.txt hard-code C++14; torch 2.14 headers need C++20,
#      and gloo must be compiled with the same standard or the link fails (duplicate gloo symbols).
#   2. cmake/Modules/FindPytorch.cmake decides "torch has CUDA" from torch.version.cuda + CUDA_HOME; on a
#      machine with nvcc but no GPU (CI, login nodes) that forces a CUDA build which then fails.
# And one fix of behaviour:
#   3. The torch binding's enqueue functions (allreduce_async_, broadcast_async_, join, barrier, ...)
#      hold the GIL while they wait for the process-set table's lock, which Horovod's background thread
#      keeps through a whole negotiation cycle.  With a peer frozen that cycle never ends, so the rank's
#      main thread blocks with the GIL held and no other Python thread -- the stall watchdog
#      (megdet_hpc/engine/watchdog.py) -- runs again: the job hangs to its wall time.  Every enqueue
#      now releases the GIL (pybind11 call_guard), as wait_and_clear already does; they touch only C++
#      objects.  The build is versioned 0.28.1+megdet.gil so set-up can tell it from a stock install.
# We patch exactly those lines, build a wheel once, and keep it in a cache dir so set-up is idempotent.
#
# Environment:
#   PYTHON                 python of the target venv (default: python)
#   MEGDET_CACHE           cache dir for the sdist and built wheel (default: ~/.cache/megdet_hpc)
#   HOROVOD_GPU_OPERATIONS set to NCCL on a GPU cluster: the CUDA test is then kept and NCCL is built.
set -euo pipefail
PYTHON=${PYTHON:-python}
CACHE=${MEGDET_CACHE:-$HOME/.cache/megdet_hpc}
VERSION=0.28.1
BUILD=$VERSION+megdet.gil  # the version this script's patched build reports

installed=$("$PYTHON" -c "import horovod.torch, horovod; print(horovod.__version__)" 2>/dev/null || true)
if [ "$installed" = "$BUILD" ]; then
  echo "[build_horovod] horovod already installed: $installed"
  exit 0
fi
[ -z "$installed" ] || echo "[build_horovod] replacing horovod $installed by the patched build $BUILD"

torch_tag=$("$PYTHON" -c 'import torch; print(torch.__version__.replace("+", "_"))')
if [ -n "${HOROVOD_GPU_OPERATIONS:-}" ]; then flavour=gpu; else flavour=cpu; fi
wheel_dir="$CACHE/horovod-$BUILD-torch$torch_tag-$flavour"
mkdir -p "$wheel_dir"
wheel=$(ls "$wheel_dir"/horovod-*.whl 2>/dev/null | head -n1 || true)

if [ -z "$wheel" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  sdist="$CACHE/horovod-$VERSION.tar.gz"
  if [ ! -f "$sdist" ]; then
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
    mv "$work/horovod-$VERSION.tar.gz" "$sdist"
  fi
  tar xzf "$sdist" -C "$work"
  src="$work/horovod-$VERSION"
  # (1) C++ standard: 14 -> 20 for horovod (root) and the torch extension, and gloo follows the root.
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  sed -i 's/set(CMAKE_CXX_STANDARD 17)\\n/set(CMAKE_CXX_STANDARD 20)\\n/' "$src/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 20' "$src/horovod/torch/CMakeLists.txt" || { echo "[build_horovod] C++ patch did not apply" >&2; exit 1; }
  # (2) CUDA detection: on a CPU-only build force the torch CUDA test to False.
  if [ "$flavour" = cpu ]; then
    sed -i 's/print(True if ((torch.version.cuda is not None) and (CUDA_HOME is not None)) else False)/print(False)/' \
      "$src/cmake/Modules/FindPytorch.cmake"
    grep -q 'print(False)' "$src/cmake/Modules/FindPytorch.cmake" || { echo "[build_horovod] CUDA patch did not apply" >&2; exit 1; }
    export HOROVOD_CPU_OPERATIONS=${HOROVOD_CPU_OPERATIONS:-gloo}
  fi
  # (3) Release the GIL around every enqueue of the torch binding; version the build.
  ops="$src/horovod/torch/mpi_ops_v2.cc"
  sed -i 's/&\(Do[A-Za-z]*\));/\&\1, py::call_guard<py::gil_scoped_release>());/' "$ops"
  [ "$(grep -c 'py::call_guard<py::gil_scoped_release>()' "$ops")" -ge 100 ] || { echo "[build_horovod] GIL patch did not apply" >&2; exit 1; }
  sed -i "s/^__version__ = '$VERSION'$/__version__ = '$BUILD'/" "$src/horovod/__init__.py"
  grep -q "__version__ = '$BUILD'" "$src/horovod/__init__.py" || { echo "[build_horovod] version patch did not apply" >&2; exit 1; }
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
  export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
  echo "[build_horovod] building horovod $VERSION ($flavour) against torch $torch_tag; a few minutes"
  "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps "$src" -w "$wheel_dir"
  wheel=$(ls "$wheel_dir"/horovod-*.whl | head -n1)
fi
"$PYTHON" -m pip install -q --no-deps "$wheel"
# Horovod's runtime dependencies (cloudpickle, psutil, pyyaml, packaging) without touching torch.
"$PYTHON" -m pip install -q cloudpickle psutil pyyaml packaging
echo "[build_horovod] installed $wheel"
