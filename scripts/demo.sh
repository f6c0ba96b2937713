#!/usr/bin/env bash
# The main job on the embedded data: generate the synthetic COCO dataset, train the demo config with
# `horovodrun -np 2` and CGBN on CPU, evaluate on the val split, print a short report.
# Re-running resumes/finishes from the checkpoints in output/demo (nothing is deleted).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${DEMO_OUTPUT:-output/demo}
NP=${DEMO_NP:-2}
start=$(date +%s)
python -m megdet_hpc.data.synthetic --out datasets/synthetic --train 400 --val 100 --size 128
# --mpi: Horovod's MPI controller; bench/cgbn.py measured CGBN through it ~4.8x cheaper than through
# Horovod's gloo controller on this kind of machine.
horovodrun -np "$NP" -H "localhost:$NP" --mpi --mpi-args="--oversubscribe --bind-to none" \
  python -m megdet_hpc.train --config configs/demo_cpu.yaml "train.output_dir=$OUT" "$@"
python -m megdet_hpc.engine.report "$OUT"
echo "demo wall time: $(( $(date +%s) - start )) s"
