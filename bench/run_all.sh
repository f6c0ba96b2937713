#!/usr/bin/env bash
# make bench: every CPU benchmark (contenders side by side within each), results in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
python -m megdet_hpc.data.synthetic --out datasets/synthetic --train 400 --val 100 --size 128
echo "=== bench/cgbn.py --against e2095c9 (this layer vs the one before the CUDA rewrite: CPU regression check)"
python bench/cgbn.py --against e2095c9
for b in cgbn train_step comm_volume checkpoint eval; do
  echo "=== bench/$b.py"
  python "bench/$b.py"
done
echo "=== planner, calibrated on this machine (demo config)"
python -m megdet_hpc.plan --config configs/demo_cpu.yaml --calibrate --launcher mpirun --gpus 1 2 4 8 --out bench/results/plan_demo
python -m megdet_hpc.plan --config configs/demo_cpu.yaml --calibrate --launcher hvd-mpi --gpus 1 2 4 8 --out bench/results/plan_demo_hvd
echo "=== planner, MegDet 2018 preset (bs256 config)"
python -m megdet_hpc.plan --config configs/megdet_r50_fpn_bs256.yaml --preset megdet2018 \
  --gpus 8 16 32 64 128 --out bench/results/plan_megdet2018
python -m megdet_hpc.plan --config configs/megdet_r50_fpn_bs16.yaml --preset megdet2018 \
  --gpus 8 --out bench/results/plan_megdet2018_bs16
