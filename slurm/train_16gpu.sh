#!/bin/bash
# train_16gpu.sh: 16 GPU(s)
# Regenerate with: make slurm-scripts (or python -m megdet_hpc.launch sbatch ...); do not edit by hand.
#SBATCH --job-name=megdet-16gpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-task=1
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.out
#
# 16 task(s) = 2 node(s) x 8 GPU(s), 2 image(s) each: total batch 32; the LR
# follows the linear scaling rule from the config's base_lr/base_batch, and the schedule is rescaled
# in images (--total-batch).
# Preemption: Slurm sends USR2 120 s before the time limit (and at preemption with
# preempt_send_user_signal).  USR2 rather than USR1 because NCCL may use SIGUSR1 (submitit does the
# same).  Every rank only sets a flag; at the next iteration the ranks agree, rank 0 writes an atomic
# checkpoint and runs `scontrol requeue`; the requeued job resumes from it automatically.
#
# Override at submission time without editing:
#   MEGDET_CONFIG=... MEGDET_OUTPUT_DIR=... MEGDET_EXTRA_ARGS="solver.max_iter=100" sbatch train_16gpu.sh
set -euo pipefail

DEFAULT_CONFIG=configs/megdet_r50_fpn_bs16.yaml
DEFAULT_OUTPUT_DIR=output/megdet_r50_fpn_16gpu
CONFIG=${MEGDET_CONFIG:-$DEFAULT_CONFIG}
OUTPUT_DIR=${MEGDET_OUTPUT_DIR:-$DEFAULT_OUTPUT_DIR}
read -r -a EXTRA_ARGS <<< "${MEGDET_EXTRA_ARGS:-}"
PYTHON=${MEGDET_PYTHON:-python}

# Horovod/NCCL settings (GPU clusters).  Tensor fusion batches the many small gradient tensors; the
# cycle time trades latency for fusion.  NCCL_SOCKET_IFNAME/NCCL_IB_HCA select the fabric.
export HOROVOD_FUSION_THRESHOLD=${HOROVOD_FUSION_THRESHOLD:-67108864}
export HOROVOD_CYCLE_TIME=${HOROVOD_CYCLE_TIME:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

echo "[megdet] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: config $CONFIG -> $OUTPUT_DIR"
mkdir -p "$OUTPUT_DIR"

set +e
srun --mpi=pmix --kill-on-bad-exit=1 --cpu-bind=none \
  "$PYTHON" -u -m megdet_hpc.train --config "$CONFIG" --total-batch 32 \
  "train.output_dir=$OUTPUT_DIR" "data.images_per_gpu=2" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
status=$?
set -e
if [ "$status" -eq 3 ]; then
  echo "[megdet] checkpointed after a preemption signal; the job was requeued and will resume"
  exit 0
fi
exit "$status"
